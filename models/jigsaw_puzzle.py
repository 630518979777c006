"""The geometry of jigsaw puzzles (Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations
by Solving Jigsaw Puzzles"): the permutation set, cutting tiles out of a 3x3 grid, shuffling them.

Pure functions of the images and of explicitly passed random draws, tested against their definitions;
the head that draws the puzzles and classifies them is in models/jigsaw.py.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch
from torch import Tensor

GRID = 3  # the jigsaw puzzle is GRID x GRID tiles
PIECES = GRID * GRID


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
