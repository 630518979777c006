"""What the encoder learnt, as a picture (Wu et al. 2018, Fig. 5): eval-set queries and their nearest training
images by the encoder's cosine similarity, each neighbour framed green where its class is the query's, red where not.

`nearest` is the search (pure numpy, on L2-normalised embeddings); `draw_retrieval_grid` draws one row per query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SCALE, BORDER, GAP, CAPTION = 3, 3, 6, 14  # canvas pixels: per image pixel, frame, between tiles, under a tile's row
COLOURS = {"query": "#2b83ba", "correct": "#1a9641", "wrong": "#d7191c"}


@dataclass
class Retrieval:
    """Queries and their neighbours: images uint8 [N, C, H, W] (C 1 or 3) and int labels."""

    query_images: np.ndarray
    query_labels: np.ndarray
    neighbour_images: np.ndarray  # [Q, K, C, H, W]
    neighbour_labels: np.ndarray  # [Q, K]
    similarities: np.ndarray  # [Q, K] cosine
    class_names: Sequence[str] = ()
    caption: str = ""  # which encoder, which sets

    @property
    def precision(self) -> float:
        """The share of neighbours of the query's class."""
        return float((self.neighbour_labels == self.query_labels[:, None]).mean())


def nearest(queries: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [Q, k], cosine similarities [Q, k]) of each query's k most similar bank rows, most similar first;
    `queries` [Q, D] and `bank` [M, D] L2-normalised."""
    similarity = queries @ bank.T
    k = min(k, bank.shape[0])
    top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1, kind="stable")
    index = np.take_along_axis(top, order, axis=1)
    return index, np.take_along_axis(similarity, index, axis=1)


def one_per_class(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of the first image of each class in order of first appearance, `count` of them (fewer classes: the
    next images in order fill up), so the grid shows as many classes as it can."""
    _, first = np.unique(labels, return_index=True)
    chosen = [int(i) for i in np.sort(first)[:count]]
    taken = set(chosen)
    chosen += [i for i in range(len(labels)) if i not in taken][:count - len(chosen)]
    return np.asarray(sorted(chosen), dtype=np.int64)


def _name(retrieval: Retrieval, label: int) -> str:
    names = retrieval.class_names
    return names[label] if 0 <= label < len(names) else str(label)


def _rgb(colour: str) -> np.ndarray:
    return np.asarray([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)


def _tile(image: np.ndarray, frame: str) -> np.ndarray:
    """[C, H, W] uint8 -> an enlarged RGB tile inside a frame of colour `frame`."""
    rgb = np.repeat(image[:1], 3, axis=0) if image.shape[0] == 1 else image[:3]
    big = np.moveaxis(rgb, 0, -1).repeat(SCALE, axis=0).repeat(SCALE, axis=1)
    tile = np.empty((big.shape[0] + 2 * BORDER, big.shape[1] + 2 * BORDER, 3), dtype=np.uint8)
    tile[:] = _rgb(frame)
    tile[BORDER:-BORDER, BORDER:-BORDER] = big
    return tile


def _left(column: int, tile_w: int) -> int:
    """Canvas x of column 0 (the query) or a neighbour's column, after a wider gap."""
    return 0 if column == 0 else column * (tile_w + GAP) + 2 * GAP


def mosaic(retrieval: Retrieval) -> tuple[np.ndarray, int, int]:
    """The grid as one RGB image, and its tile width and height (a row is a tile and its caption space)."""
    rows, k = retrieval.neighbour_labels.shape
    tile_h = retrieval.query_images.shape[2] * SCALE + 2 * BORDER
    tile_w = retrieval.query_images.shape[3] * SCALE + 2 * BORDER
    canvas = np.full((rows * (tile_h + CAPTION), _left(k, tile_w) + tile_w, 3), 255, dtype=np.uint8)
    for row in range(rows):
        top = row * (tile_h + CAPTION)
        canvas[top:top + tile_h, :tile_w] = _tile(retrieval.query_images[row], COLOURS["query"])
        for column in range(1, k + 1):
            same = retrieval.neighbour_labels[row, column - 1] == retrieval.query_labels[row]
            left = _left(column, tile_w)
            canvas[top:top + tile_h, left:left + tile_w] = _tile(retrieval.neighbour_images[row, column - 1],
                                                                 COLOURS["correct" if same else "wrong"])
    return canvas, tile_w, tile_h


def draw_retrieval_grid(retrieval: Retrieval, path: Path) -> None:
    """One row per query: the query, then its neighbours, most similar first, each captioned with its cosine
    similarity and, where its class is not the query's, that class (the confusions are the interesting part).
    One image with text over it: a subplot per tile would take matplotlib seconds per figure."""
    canvas, tile_w, tile_h = mosaic(retrieval)
    rows, k = retrieval.neighbour_labels.shape
    dpi, left_margin, top_margin = 100, 1.0, 0.75  # inches
    width, height = canvas.shape[1] / dpi + left_margin + 0.1, canvas.shape[0] / dpi + top_margin + 0.05
    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    ax = figure.add_axes((left_margin / width, 0.05 / height, canvas.shape[1] / dpi / width, canvas.shape[0] / dpi / height))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for column in range(k + 1):
        ax.text(_left(column, tile_w) + tile_w / 2, -3, "query" if column == 0 else f"#{column}", ha="center",
                va="bottom", fontsize=8)
    for row in range(rows):
        top, query_label = row * (tile_h + CAPTION), int(retrieval.query_labels[row])
        ax.text(-8, top + tile_h / 2, _name(retrieval, query_label), ha="right", va="center", fontsize=9)
        for column in range(1, k + 1):
            label, similarity = int(retrieval.neighbour_labels[row, column - 1]), retrieval.similarities[row, column - 1]
            wrong = label != query_label
            ax.text(_left(column, tile_w) + tile_w / 2, top + tile_h + 1,
                    f"{_name(retrieval, label)} {similarity:.3f}" if wrong else f"{similarity:.3f}", ha="center",
                    va="top", fontsize=6, color=COLOURS["wrong"] if wrong else "black")
    title = (f"Nearest training images (blue: the query; green frame: same class, red: other; "
             f"{retrieval.precision:.0%} same class)")
    figure.suptitle(title + (f"\n{retrieval.caption}" if retrieval.caption else ""), fontsize=9, y=1 - 0.05 / height,
                    va="top")
    figure.savefig(path, dpi=dpi)
