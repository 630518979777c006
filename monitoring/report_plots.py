"""The curves of `streamssl report`, drawn from a run's history rows (RUN_DIR/metrics.jsonl) against samples seen.

Each `draw_*` writes one PNG and returns "" or, where the history holds nothing to draw, says why in a sentence
(the report prints that instead of the image). Figures are built on matplotlib's object API with the Agg canvas:
no display, no global pyplot state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Row = dict[str, Any]
SIZE = (7.0, 3.6)


def series(rows: Sequence[Row], kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(samples seen, value) of the rows of `kind` where `key` holds a number (null and missing left out)."""
    points = [(row.get("samples_seen", 0), row[key]) for row in rows
              if row.get("kind") == kind and isinstance(row.get(key), int | float) and not isinstance(row[key], bool)]
    if not points:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*points, strict=True)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def smoothed(y: np.ndarray, points: int = 50) -> np.ndarray:
    """A centred moving average over ~1/`points` of the curve: the trend through a noisy per-interval value."""
    window = max(len(y) // points, 1)
    if window == 1:
        return y
    padded = np.pad(y, (window // 2, window - 1 - window // 2), mode="edge")
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def _figure(panels: int = 1) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=(SIZE[0], SIZE[1] * panels), layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(panels, 1, i + 1) for i in range(panels)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("samples seen")
    return figure, axes


def _curve(ax: Axes, x: np.ndarray, y: np.ndarray, label: str, color: str) -> None:
    """The values as a faint line with their trend over it where there are many."""
    trend = smoothed(y)
    if trend is y:
        ax.plot(x, y, color=color, marker="." if len(x) < 30 else None, label=label)
    else:
        ax.plot(x, y, color=color, alpha=0.3, linewidth=0.8)
        ax.plot(x, trend, color=color, label=f"{label} (moving average)")


def _save(figure: Figure, path: Path) -> str:
    figure.savefig(path, dpi=100)
    return ""


def draw_loss(rows: Sequence[Row], path: Path) -> str:
    x, y = series(rows, "progress", "loss")
    if not len(x):
        return "no finite training loss in the history yet"
    figure, (ax,) = _figure()
    _curve(ax, x, y, "training loss (last step of each progress interval)", "tab:blue")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.legend(loc="best", fontsize="small")
    return _save(figure, path)


# Beside the kNN curve: the same subset scored without learning, so a curve below them means nothing was learnt.
BASELINES = {"knn_raw_pixels": ("raw pixels", "tab:gray"), "knn_untrained": ("untrained encoder", "tab:red")}


def draw_knn(rows: Sequence[Row], path: Path) -> str:
    x, y = series(rows, "eval", "knn_top1")
    if not len(x):
        return "no kNN evaluation in the history (eval.dataset=none, or the run stopped before its first eval)"
    figure, (ax,) = _figure()
    ax.plot(x, y, color="tab:green", marker="o", markersize=3, label="kNN top-1 (this run's encoder)")
    for key, (label, color) in BASELINES.items():
        _, values = series(rows, "eval", key)
        if len(values):
            ax.axhline(values[-1], color=color, linestyle="--", label=f"{label} {values[-1]:.3f}")
    published_x, _ = series(rows, "publish", "version")
    at = np.isin(x, published_x)
    if at.any():
        ax.plot(x[at], y[at], linestyle="none", marker="s", markersize=5, markerfacecolor="none",
                markeredgecolor="black", label="published")
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1")
    ax.set_title(f"Weighted kNN top-1 on the eval set (last {y[-1]:.3f})")
    ax.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def draw_throughput(rows: Sequence[Row], path: Path) -> str:
    x, rate = series(rows, "progress", "samples_per_second")
    if not len(x):
        return "no progress interval in the history yet"
    wait_x, wait = series(rows, "progress", "input_wait_share")
    figure, axes = _figure(2 if len(wait_x) else 1)
    _curve(axes[0], x, rate, "samples/s", "tab:purple")
    evals, _ = series(rows, "eval", "step")
    if 0 < len(evals) <= 50:  # an interval that held an eval dips: the eval's time counts in it
        for at in evals:
            axes[0].axvline(at, color="tab:green", alpha=0.35, linestyle=":")
        axes[0].plot([], [], color="tab:green", alpha=0.6, linestyle=":", label="eval")
    axes[0].set_ylim(bottom=0)
    axes[0].set_ylabel("samples / s")
    axes[0].set_title("Throughput per progress interval")
    axes[0].legend(loc="best", fontsize="small")
    if len(wait_x):
        _curve(axes[1], wait_x, wait, "share of the interval spent waiting for input", "tab:orange")
        axes[1].set_ylim(-0.02, 1.02)
        axes[1].set_ylabel("input-wait share")
        axes[1].set_title("Input wait (near 0: the trainer is the bottleneck; near 1: the stream is)")
        axes[1].legend(loc="best", fontsize="small")
    return _save(figure, path)


# What a clustering method logs about the balance of its clusters, as (key, label) per method's log.
BALANCE = (("cluster_size_max_share", "largest cluster's share"), ("cluster_size_min_share", "smallest cluster's share"),
           ("prototype_usage", "share of prototypes in use"))


def draw_cluster_sizes(sizes: np.ndarray, title: str, rows: Sequence[Row], path: Path) -> str:
    """Cluster sizes, largest first, against the equal split; below them the logged balance over the run."""
    # DeepCluster logs zero shares until its first clustering: those rows say nothing about balance
    clustered = [row for row in rows if row.get("clustered", 1) != 0]
    curves = [(label, *series(clustered, "progress", key)) for key, label in BALANCE]
    curves = [curve for curve in curves if len(curve[1])]
    figure, axes = _figure(2 if curves else 1)
    ordered = np.sort(np.asarray(sizes, dtype=float))[::-1]
    rank = np.arange(1, len(ordered) + 1)
    axes[0].bar(rank, ordered, width=0.85, color="tab:cyan")
    equal = ordered.sum() / max(len(ordered), 1)
    axes[0].axhline(equal, color="black", linestyle="--", label=f"equal split ({equal:,.1f})")
    empty = int((ordered == 0).sum())
    axes[0].set_title(f"{title}\n{len(ordered)} clusters, {empty} empty, largest {ordered[0] / max(ordered.sum(), 1):.0%}",
                      fontsize=10)
    axes[0].set_xlabel("cluster, largest first")
    axes[0].set_ylabel("members")
    axes[0].legend(loc="upper right", fontsize="small")
    if curves:
        for (label, x, y), color in zip(curves, ("tab:red", "tab:blue", "tab:green"), strict=False):
            _curve(axes[1], x, y, label, color)
        axes[1].set_ylim(bottom=0)
        axes[1].set_ylabel("share")
        axes[1].set_title("Cluster balance over the run (the method's logs)", fontsize=10)
        axes[1].legend(loc="best", fontsize="small")
    return _save(figure, path)
