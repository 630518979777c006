"""Jigsaw puzzles: learning features by putting shuffled tiles back in order (Noroozi & Favaro 2016,
"Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles").

Each image is cut into a 3x3 grid of tiles, the tiles are shuffled by one of a fixed set of permutations
chosen to be far apart in Hamming distance, every tile is encoded on its own by the backbone, and a
classifier on the 9 concatenated tile features names the permutation. Solving it means knowing what an
object's parts are and where they go. The puzzle geometry is in models/jigsaw_puzzle.py; the head
(`JigsawHead`) is shared with the auxiliary task that models/multitask.py adds to other methods; the
method adds the full-view pass that keeps the backbone's batch-norm statistics those of full images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.models.bn import running_stats_frozen
from streamssl.models.jigsaw_puzzle import (
    GRID,
    PIECES,
    hamming_permutations,
    jigsaw_cell,
    jigsaw_tiles,
    normalize_tiles,
    shuffle_tiles,
)
from streamssl.models.method import Method, embedding_std
from streamssl.models.pretext import PretextOutput, classification_output, in_memory_format_of, transformation_classifier


class JigsawHead(nn.Module):
    """Predicts which of a fixed set of permutations shuffled the 3x3 tiles of an image (Noroozi & Favaro 2016).

    Per image, `forward` draws (from torch's default generator, on the CPU) the grid position, each tile's
    position inside its cell and the permutation; it shuffles the tiles, resizes and normalises each one,
    encodes each tile separately with the shared backbone (the paper's context-free network: no tile sees
    another) and classifies the 9 features concatenated in shuffled order with an MLP.

    Tile geometry, for 28 px images (9 px cells). The paper cuts 64 px tiles out of 75 px cells, so
    neighbouring tiles are 0-22 px apart. Scaled down to 8 px tiles in 9 px cells, that left 0-2 px
    (mean 1): adjacent edges nearly touch and the puzzle can be solved by matching edge pixels (together
    with the batch-norm problem below, such an encoder scored below a random one in kNN accuracy, see
    docs/BENCHMARKS.md). Here tiles are 6 px and every two neighbours are at least `gap` = 2 px apart
    (offsets in {1, 2} of the cell, gaps of 2-4 px, mean 3, a third of the cell): no edge pixel has its
    neighbour in the next tile, so only shape that carries on across the gap links two tiles. The
    backbone does not take 6 px inputs: the ConvNet's three floor-dividing 2x max-pools turn 6 or 7 px
    into 0 px; 8 px is the least that passes. Tiles are therefore upsampled to `resize` = 12 px (exactly
    2x, bilinear, which reads only the tile's own pixels, so nothing from the gap leaks in): the pools
    give 6, 3, 1 px, so the last block's 3x3 conv still sees a 3x3 map, at 9 x 12^2 = 1296 px per image,
    1.65x the pixels of one 28 px view (16 px would cost 2.9x).

    Batch-norm statistics. The tiles train the backbone with their own batch statistics, but they do not
    update its running statistics (`running_stats_frozen`): those are what the published encoder uses,
    in eval mode, on full images, and as an auxiliary head (models/multitask.py) this would otherwise
    overwrite every method's statistics with those of normalised tiles. The standalone method
    (`Jigsaw`, below) passes the full view through the backbone to keep them up to date.

    Args:
        feature_dim: width of the backbone's features.
        num_permutations: number of puzzle classes. The paper uses 1000; with 100 each class gets 10x the
            examples in a short CPU run and the classifier's last layer is 10x smaller, at the price of an
            easier puzzle [100].
        permutation_seed: seed of `hamming_permutations`; the set is also a buffer, so a checkpoint carries
            it [0].
        tile: side of each tile in pixels, cut out of its min(H, W) // 3 px grid cell [6].
        gap: least distance in pixels between two neighbouring tiles; each tile's offset in its cell is
            drawn from gap // 2 + [0, cell - tile - gap], so images need min(H, W) >= 3 * (tile + gap) [2].
        resize: side the tiles are resized to before the backbone; it must survive the backbone's
            downsampling (>= 8 for the ConvNet) [12].
        hidden_dim: width of the classifier's hidden layer [512].

    `forward` returns features [9B, feature_dim]: the tiles, image by image, in shuffled order.
    """

    # The permutation set, a buffer registered in __init__; declared so that it types as Tensor, not Tensor | Module.
    permutations: Tensor

    task = "jigsaw"

    def __init__(self, feature_dim: int, *, num_permutations: int = 100, permutation_seed: int = 0, tile: int = 6,
                 gap: int = 2, resize: int = 12, hidden_dim: int = 512) -> None:
        super().__init__()
        if tile < 1 or gap < 0 or resize < 1:
            raise ValueError(f"jigsaw needs tile >= 1, gap >= 0 and resize >= 1, got {tile}, {gap}, {resize}")
        self.tile, self.gap, self.resize = tile, gap, resize
        permutations, self.min_hamming_distance = hamming_permutations(num_permutations, permutation_seed)
        self.register_buffer("permutations", permutations)
        self.classifier = transformation_classifier(PIECES * feature_dim, hidden_dim, num_permutations)

    def forward(self, backbone: nn.Module, images: Tensor) -> PretextOutput:
        tiles, labels = self.puzzles(images)
        # Batch statistics of tiles train the backbone but must not become its running statistics (see above).
        with running_stats_frozen(backbone):
            features = backbone(tiles)  # [9B, feature_dim]
        logits = self.classifier(features.reshape(len(images), -1))
        return classification_output(logits, labels, features)

    def puzzles(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Draws a puzzle per image: the backbone's input [9B, C, resize, resize] (the tiles of image b,
        shuffled, are rows 9b .. 9b + 8) and the permutation labels [B]."""
        grid_origin, tile_offsets, labels = self._draw_puzzles(images)
        tiles = jigsaw_tiles(images, self.tile, grid_origin, tile_offsets)
        shuffled = shuffle_tiles(tiles, self.permutations[labels]).flatten(0, 1)
        if self.resize != self.tile:
            shuffled = F.interpolate(shuffled, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        # Normalised after resizing, so what the backbone sees has exactly zero mean and unit std per tile.
        return in_memory_format_of(normalize_tiles(shuffled), images), labels

    @torch.no_grad()
    def _draw_puzzles(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Random grid origins [B, 2], tile offsets [B, 9, 2] and permutation labels [B]."""
        batch, height, width = len(images), *images.shape[-2:]
        cell = jigsaw_cell(height, width)
        jitter = cell - self.tile - self.gap
        if jitter < 0:
            raise ValueError(f"jigsaw tiles of {self.tile} px, {self.gap} px apart, need images of at least "
                             f"{GRID * (self.tile + self.gap)} px, got {height}x{width}")
        # Drawn on the CPU from torch's default generator: the same puzzles on CPU and CUDA, reproducible from
        # torch.get_rng_state() alone, which the trainer checkpoints.
        grid_origin = torch.stack([torch.randint(0, height - GRID * cell + 1, (batch,)),
                                   torch.randint(0, width - GRID * cell + 1, (batch,))], dim=1)
        # Neighbours are cell - tile + (their offset difference) apart, so offsets spanning `jitter` px keep
        # them at least `gap` apart; starting at gap // 2 centres the tiles in their cells on average.
        tile_offsets = self.gap // 2 + torch.randint(0, jitter + 1, (batch, PIECES, 2))
        labels = torch.randint(0, len(self.permutations), (batch,))
        return grid_origin.to(images.device), tile_offsets.to(images.device), labels.to(images.device)


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
        (JigsawHead, above, explains the choice of tile, gap and resize for 28 px images.)

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
