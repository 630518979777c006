"""Jigsaw puzzles: learning features by putting shuffled tiles back in order (Noroozi & Favaro 2016,
"Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles").

Each image is cut into a 3x3 grid of tiles, the tiles are shuffled by one of a fixed set of permutations
chosen to be far apart in Hamming distance, every tile is encoded on its own by the backbone, and a
classifier on the 9 concatenated tile features names the permutation. Solving it means knowing what an
object's parts are and where they go. The math lives in models/pretext.py, shared with the auxiliary
head that models/multitask.py adds to other methods; this module adds the full-view pass that keeps the
backbone's batch-norm statistics those of full images.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from streamssl.models.method import Method, embedding_std
from streamssl.models.pretext import JigsawHead


class Jigsaw(Method):
    """Jigsaw puzzle solving as a standalone method: one view, an N-way cross-entropy over permutations.

    Hyper-parameters (keyword-only, defaults in brackets):
        num_permutations: N, the size of the permutation set (the paper's 1000 is a lot of classes for
            short CPU runs on 28 px images) [100].
        permutation_seed: seed of the greedy maximal-Hamming-distance permutation set [0].
        tile: side of a tile in pixels, a random crop of its min(H, W) // 3 px grid cell [6].
        gap: least distance in pixels between neighbouring tiles, so that the network cannot match tile
            edges; needs min(H, W) >= 3 * (tile + gap) [2].
        resize: side the tiles are upsampled to before the backbone, which must survive its
            downsampling (>= 8 px for the ConvNet) [12].
        hidden_dim: width of the classifier's hidden layer [512].
        (models/pretext.py's JigsawHead explains the choice of tile, gap and resize for 28 px images.)

    Batch-norm statistics: the tiles do not update the backbone's running statistics (JigsawHead), so
    every step also passes the untiled view through the backbone, without grad, in training mode (a
    forward pass over 28^2 = 784 px per image, against forward and backward over the tiles' 1296 px).
    It is the only pass that updates them, so the published encoder normalises full images, in eval
    mode, with statistics of full images.

    State (buffers): `head.permutations`, the [N, 9] permutation set, so a checkpoint carries it (it is
    also rebuilt identically from the seed), and the backbone's BN statistics. Random draws per step
    (grid position, tile jitter, permutation of each image) come from torch's default generator, which
    the trainer checkpoints.

    Logs: `jigsaw_accuracy` (share of puzzles whose permutation is named correctly; 1/N is chance),
    `embedding_std` of the backbone features of the untiled view (the features that get published).
    """

    name = "jigsaw"
    num_views = 1

    def __init__(self, backbone: nn.Module, feature_dim: int, *, num_permutations: int = 100, permutation_seed: int = 0,
                 tile: int = 6, gap: int = 2, resize: int = 12, hidden_dim: int = 512) -> None:
        super().__init__(backbone, feature_dim)
        self.head = JigsawHead(feature_dim, num_permutations=num_permutations, permutation_seed=permutation_seed,
                               tile=tile, gap=gap, resize=resize, hidden_dim=hidden_dim)

    def forward(self, views: list[Tensor], ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        images = views[0]
        # No loss on the full view: it is here for the BN running statistics (and the log), so no grad either.
        with torch.no_grad():
            full_features = self.backbone(images)
        loss, accuracy, _ = self.head(self.backbone, images)  # shuffle tiles, predict the permutation
        return loss, {"jigsaw_accuracy": accuracy, "embedding_std": embedding_std(full_features)}
