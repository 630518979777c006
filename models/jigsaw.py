"""Jigsaw puzzles: learning features by putting shuffled tiles back in order (Noroozi & Favaro 2016,
"Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles").

Each image is cut into a 3x3 grid of tiles, the tiles are shuffled by one of a fixed set of permutations
chosen to be far apart in Hamming distance, every tile is encoded on its own by the backbone, and a
classifier on the 9 concatenated tile features names the permutation. Solving it means knowing what an
object's parts are and where they go. The math lives in models/pretext.py, shared with the auxiliary
head that models/multitask.py adds to other methods.
"""

from __future__ import annotations

from torch import Tensor, nn

from streamssl.models.method import Method, embedding_std
from streamssl.models.pretext import JigsawHead


class Jigsaw(Method):
    """Jigsaw puzzle solving as a standalone method: one view, an N-way cross-entropy over permutations.

    Hyper-parameters (keyword-only, defaults in brackets):
        num_permutations: N, the size of the permutation set (the paper's 1000 is a lot of classes for
            short CPU runs on 28 px images) [100].
        permutation_seed: seed of the greedy maximal-Hamming-distance permutation set [0].
        tile: side of a tile in pixels; each is a random crop of its min(H, W) // 3 px grid cell, the gap
            stopping the network from matching tile edges; needs min(H, W) >= 3 * tile [8].
        hidden_dim: width of the classifier's hidden layer [512].

    State (buffers): `head.permutations`, the [N, 9] permutation set, so a checkpoint carries it (it is
    also rebuilt identically from the seed). Random draws per step (grid position, tile jitter,
    permutation of each image) come from torch's default generator, which the trainer checkpoints.

    Logs: `jigsaw_accuracy` (share of puzzles whose permutation is named correctly; 1/N is chance),
    `embedding_std` of the backbone features of the 9B tiles (the untransformed view is never encoded).
    """

    name = "jigsaw"
    num_views = 1

    def __init__(self, backbone: nn.Module, feature_dim: int, *, num_permutations: int = 100, permutation_seed: int = 0,
                 tile: int = 8, hidden_dim: int = 512) -> None:
        super().__init__(backbone, feature_dim)
        self.head = JigsawHead(feature_dim, num_permutations=num_permutations, permutation_seed=permutation_seed,
                               tile=tile, hidden_dim=hidden_dim)

    def forward(self, views: list[Tensor], ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        loss, accuracy, tile_features = self.head(self.backbone, views[0])  # shuffle tiles, predict the permutation
        return loss, {"jigsaw_accuracy": accuracy, "embedding_std": embedding_std(tile_features.detach())}
