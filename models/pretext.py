"""Pretext tasks: classify how an image was transformed, so the backbone must learn what images look like.

* Rotation prediction (Gidaris et al. 2018, "Unsupervised Representation Learning by Predicting Image
  Rotations"): every image is shown at 0, 90, 180 and 270 degrees and a head names the rotation.
* Jigsaw puzzles (Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations by Solving
  Jigsaw Puzzles"): nine tiles of a 3x3 grid, shuffled by one of a fixed set of permutations, are encoded
  one by one by the shared backbone; a head names the permutation from the concatenated tile features.

Each task is a head module whose `forward(backbone, images)` transforms the images itself, runs the
backbone on the result and returns a `PretextOutput`, so the same head serves as a standalone method
(models/rotation.py, models/jigsaw.py) and as an auxiliary loss on top of any method (models/multitask.py).
The transformations are pure functions of the images and of explicitly passed random draws, tested
against their definitions. Jigsaw tiles train the backbone without updating its batch-norm running
statistics (models/bn.py), which must describe the full images the published encoder sees; rotated
images are full images, so the rotation head lets them update as usual.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.models.bn import running_stats_frozen

ROTATIONS = 4  # 0, 90, 180, 270 degrees
GRID = 3  # the jigsaw puzzle is GRID x GRID tiles
PIECES = GRID * GRID


class PretextOutput(NamedTuple):
    """What a pretext head returns for one batch.

    Attributes:
        loss: scalar float32 cross-entropy of the transformation classifier, with grad.
        accuracy: detached scalar, share of transformed images whose transformation was named correctly.
        features: backbone features of the transformed batch, with grad (rows as the head documents).
    """

    loss: Tensor
    accuracy: Tensor
    features: Tensor


# ---------------------------------------------------------------------------------------------------------
# Rotation


def rotate_batch(images: Tensor) -> tuple[Tensor, Tensor]:
    """All four rotations of every image, and the rotation labels.

    Non-square images are first cropped to their centred square, since a quarter turn would change
    their shape.

    Args:
        images: [B, C, H, W].

    Returns:
        rotated: [4B, C, S, S] with S = min(H, W); rows k*B .. k*B + B - 1 are the batch turned by k * 90
            degrees counter-clockwise (`torch.rot90(x, k, dims=(2, 3))`), so the first B rows are the
            (cropped) images themselves.
        labels: [4B] int64, k for each row.
    """
    side = min(images.shape[-2:])
    top, left = (images.shape[-2] - side) // 2, (images.shape[-1] - side) // 2
    square = images[..., top:top + side, left:left + side]
    rotated = torch.cat([torch.rot90(square, k, dims=(2, 3)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=images.device).repeat_interleave(len(images))
    return _in_memory_format_of(rotated, images), labels


class RotationHead(nn.Module):
    """Predicts which of the four rotations was applied to an image (Gidaris et al. 2018).

    As in the paper, all four rotated copies of every image go into the same batch (rather than one random
    rotation per image), at 4x the backbone cost of one view. The head draws no random numbers.

    Args:
        feature_dim: width of the backbone's features.
        hidden_dim: width of the classifier's hidden layer; 0 gives a single linear layer on the pooled
            features, as in the paper, which leaves all the work to the backbone [0].

    `forward` returns features [4B, feature_dim] in `rotate_batch`'s row order.
    """

    task = "rotation"

    def __init__(self, feature_dim: int, *, hidden_dim: int = 0) -> None:
        super().__init__()
        self.classifier = _classifier(feature_dim, hidden_dim, ROTATIONS)

    def forward(self, backbone: nn.Module, images: Tensor) -> PretextOutput:
        rotated, labels = rotate_batch(images)
        features = backbone(rotated)
        return _classification_output(self.classifier(features), labels, features)


# ---------------------------------------------------------------------------------------------------------
# Jigsaw


def hamming_permutations(count: int, seed: int = 0) -> tuple[Tensor, int]:
    """A fixed set of `count` permutations of the 9 jigsaw tiles that are far apart in Hamming distance.

    Greedy selection over all 9! permutations (Noroozi & Favaro 2016, Algorithm 1):
    start from one permutation drawn with `seed`, then repeatedly add the permutation whose minimum
    Hamming distance to those already chosen is largest. The paper's algorithm maximises the *average*
    distance instead; here that is only the tie-break, because a large minimum distance is what keeps any
    two puzzle classes from being nearly the same puzzle. Remaining ties go to the first candidate in a
    seed-shuffled order, so the result depends on `seed` only. Cached: building the set takes ~0.1 s
    for count=100.

    Args:
        count: number of permutations, 2 <= count <= 9!.
        seed: seed of the first choice and of the tie order.

    Returns:
        permutations: [count, 9] int64, each row a permutation of 0..8.
        min_distance: the smallest Hamming distance between two rows.
    """
    table, min_distance = _greedy_permutations(count, seed, PIECES)
    return torch.tensor(table, dtype=torch.int64), min_distance


@functools.lru_cache(maxsize=8)
def _greedy_permutations(count: int, seed: int, pieces: int) -> tuple[np.ndarray, int]:
    total = math.factorial(pieces)
    if not 2 <= count <= total:
        raise ValueError(f"need 2 <= count <= {total} permutations, got {count}")
    candidates = np.fromiter(itertools.chain.from_iterable(itertools.permutations(range(pieces))),
                             dtype=np.uint8, count=total * pieces).reshape(total, pieces)
    candidates = candidates[np.random.default_rng(seed).permutation(total)]
    # One row per tile position: comparing a row with a scalar is ~20x faster than a [9!, 9] comparison.
    by_position = np.ascontiguousarray(candidates.T)
    min_distance = np.full(total, pieces, dtype=np.int64)  # to the chosen set; 0 marks the chosen ones
    sum_distance = np.zeros(total, dtype=np.int64)
    chosen = [0]  # the shuffle made candidate 0 a seeded random permutation
    achieved = pieces
    for _ in range(count - 1):
        newest = candidates[chosen[-1]]
        distance = np.zeros(total, dtype=np.int64)
        for position in range(pieces):
            distance += by_position[position] != newest[position]
        np.minimum(min_distance, distance, out=min_distance)
        sum_distance += distance
        # Lexicographic (minimum distance, total distance): the total is below the factor.
        best = int(np.argmax(min_distance * (pieces * count + 1) + sum_distance))
        achieved = min(achieved, int(min_distance[best]))
        chosen.append(best)
    table = candidates[chosen].astype(np.int64)
    table.flags.writeable = False  # shared by every caller through the cache
    return table, achieved


def jigsaw_cell(height: int, width: int) -> int:
    """Side of a grid cell: the 3x3 grid covers the largest square that fits in the image."""
    return min(height, width) // GRID


def jigsaw_tiles(images: Tensor, tile: int, grid_origin: Tensor, tile_offsets: Tensor) -> Tensor:
    """Cuts a 3x3 grid of square cells out of every image and one `tile`-sized piece out of every cell.

    Leaving a random gap between pieces (cell > tile) stops the network from solving the puzzle by
    matching edges and continuing lines across tile borders (Noroozi & Favaro 2016).

    Args:
        images: [B, C, H, W].
        tile: side of a piece in pixels, at most the cell side `jigsaw_cell(H, W)`.
        grid_origin: [B, 2] int64, (top, left) pixel of each image's grid, in [0, H - 3 * cell] x
            [0, W - 3 * cell].
        tile_offsets: [B, 9, 2] int64, (top, left) of each piece inside its cell, in [0, cell - tile].

    Returns:
        [B, 9, C, tile, tile]: the pieces in row-major grid order (piece 3 * r + c is grid row r, column c).
    """
    cell = jigsaw_cell(*images.shape[-2:])
    device = images.device
    grid_position = torch.arange(PIECES, device=device)
    top = grid_origin[:, :1] + grid_position // GRID * cell + tile_offsets[..., 0]  # [B, 9]
    left = grid_origin[:, 1:] + grid_position % GRID * cell + tile_offsets[..., 1]
    pixel = torch.arange(tile, device=device)
    rows = (top[..., None] + pixel)[..., :, None]  # [B, 9, tile, 1]
    cols = (left[..., None] + pixel)[..., None, :]  # [B, 9, 1, tile]
    batch = torch.arange(len(images), device=device)[:, None, None, None]
    # One gather for all pieces of all images, channels last so a pixel's channels come along together.
    pieces = images.permute(0, 2, 3, 1)[batch, rows, cols]  # [B, 9, tile, tile, C]
    return pieces.permute(0, 1, 4, 2, 3)


def shuffle_tiles(tiles: Tensor, order: Tensor) -> Tensor:
    """Puts the tiles of image b in the order `order[b]`: result[b, j] = tiles[b, order[b, j]].

    Args:
        tiles: [B, 9, ...].
        order: [B, 9] int64, a permutation of 0..8 per image.
    """
    return tiles[torch.arange(len(tiles), device=tiles.device)[:, None], order]


def normalize_tiles(tiles: Tensor, eps: float = 1e-5) -> Tensor:
    """Gives every tile zero mean and unit standard deviation over its pixels and channels.

    Neighbouring tiles share brightness and contrast, a shortcut to the puzzle that the paper removes the
    same way (Noroozi & Favaro 2016). A constant tile (blank background) becomes all zeros.

    Args:
        tiles: [..., C, tile, tile].
    """
    mean = tiles.mean(dim=(-3, -2, -1), keepdim=True)
    std = tiles.std(dim=(-3, -2, -1), keepdim=True, unbiased=False)
    return (tiles - mean) / (std + eps)


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
    (models/jigsaw.py) passes the full view through the backbone to keep them up to date.

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
        self.classifier = _classifier(PIECES * feature_dim, hidden_dim, num_permutations)

    def forward(self, backbone: nn.Module, images: Tensor) -> PretextOutput:
        tiles, labels = self.puzzles(images)
        # Batch statistics of tiles train the backbone but must not become its running statistics (see above).
        with running_stats_frozen(backbone):
            features = backbone(tiles)  # [9B, feature_dim]
        logits = self.classifier(features.reshape(len(images), -1))
        return _classification_output(logits, labels, features)

    def puzzles(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Draws a puzzle per image: the backbone's input [9B, C, resize, resize] (the tiles of image b,
        shuffled, are rows 9b .. 9b + 8) and the permutation labels [B]."""
        grid_origin, tile_offsets, labels = self._draw_puzzles(images)
        tiles = jigsaw_tiles(images, self.tile, grid_origin, tile_offsets)
        shuffled = shuffle_tiles(tiles, self.permutations[labels]).flatten(0, 1)
        if self.resize != self.tile:
            shuffled = F.interpolate(shuffled, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        # Normalised after resizing, so what the backbone sees has exactly zero mean and unit std per tile.
        return _in_memory_format_of(normalize_tiles(shuffled), images), labels

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


# ---------------------------------------------------------------------------------------------------------
# Shared


def _classifier(in_dim: int, hidden_dim: int, classes: int) -> nn.Module:
    if hidden_dim == 0:
        return nn.Linear(in_dim, classes)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, classes))


def _classification_output(logits: Tensor, labels: Tensor, features: Tensor) -> PretextOutput:
    logits = logits.float()  # the loss in float32 even under bf16 autocast
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
    return PretextOutput(loss, accuracy, features)


def _in_memory_format_of(images: Tensor, reference: Tensor) -> Tensor:
    """`images` in channels-last layout if `reference` is: the trainer's choice for faster convolutions."""
    if reference.dim() == 4 and reference.is_contiguous(memory_format=torch.channels_last):
        return images.contiguous(memory_format=torch.channels_last)
    return images
