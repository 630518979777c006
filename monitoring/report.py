"""The run report's page: PNG curves (monitoring/report_plots.py), the retrieval grid (monitoring/retrieval_grid.py)
and an HTML page that links them beside the run's summary.

Everything here draws what it is given (history rows, the facts and published versions read from the run dir, the
retrieval and cluster data computed from the encoder); reading a run dir is pipeline/report.py's part, since this
package imports nothing of the training stack. A figure with nothing to draw is left out, and the page says why.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamssl.monitoring.report_plots import Row, draw_cluster_sizes, draw_knn, draw_loss, draw_throughput
from streamssl.monitoring.retrieval_grid import Retrieval, draw_retrieval_grid


@dataclass
class Clusters:
    sizes: np.ndarray  # members per cluster
    title: str  # what was counted, e.g. "k-means clusters of the last clustering"


@dataclass
class ReportInputs:
    rows: Sequence[Row]  # the history, the lineage the run kept (pipeline/history.py `surviving`)
    facts: dict[str, str]  # run dir, method, backbone, …: shown first
    published: Sequence[dict[str, Any]] = ()  # one per version: version, step, samples_seen, knn_top1
    retrieval: Retrieval | str = "not computed"  # or why there is none
    clusters: Clusters | str = "not computed"
    notes: list[str] = field(default_factory=list)


@dataclass
class Panel:
    file: str
    title: str
    note: str = ""  # why it is missing; "" when drawn


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def summary(rows: Sequence[Row]) -> dict[str, str]:
    """Steps, samples, time span and the last eval, from the history."""
    last = rows[-1] if rows else {}
    evals = [row for row in rows if row.get("kind") == "eval" and isinstance(row.get("knn_top1"), float)]
    out = {"steps": str(last.get("step", 0)), "samples seen": f"{last.get('samples_seen', 0):,}",
           "history": f"{len(rows)} lines, {_when(rows[0].get('time') if rows else None)} to {_when(last.get('time'))}"}
    if evals:
        row = evals[-1]
        beside = ", ".join(f"{name} {row[key]:.4f}" for key, name in (("knn_raw_pixels", "raw pixels"),
                                                                     ("knn_untrained", "untrained encoder")) if key in row)
        out["last eval"] = f"kNN top-1 {row['knn_top1']:.4f} at step {row['step']}" + (f" ({beside})" if beside else "")
    else:
        out["last eval"] = "none in the history"
    return out


def draw_all(inputs: ReportInputs, out_dir: Path) -> list[Panel]:
    rows = inputs.rows
    figures = [Panel("loss.png", "Training loss", draw_loss(rows, out_dir / "loss.png")),
               Panel("knn.png", "kNN top-1", draw_knn(rows, out_dir / "knn.png")),
               Panel("throughput.png", "Throughput and input wait", draw_throughput(rows, out_dir / "throughput.png"))]
    clusters = inputs.clusters
    if isinstance(clusters, Clusters):
        note = draw_cluster_sizes(clusters.sizes, clusters.title, rows, out_dir / "clusters.png")
        figures.append(Panel("clusters.png", "Cluster sizes", note))
    else:
        figures.append(Panel("clusters.png", "Cluster sizes", clusters))
    if isinstance(inputs.retrieval, Retrieval):
        draw_retrieval_grid(inputs.retrieval, out_dir / "retrieval.png")
        figures.append(Panel("retrieval.png", "Nearest training images of eval queries"))
    else:
        figures.append(Panel("retrieval.png", "Nearest training images of eval queries", inputs.retrieval))
    for figure in figures:  # a figure drawn by an earlier report must not pass for this one's
        if figure.note:
            (out_dir / figure.file).unlink(missing_ok=True)
    return figures


def _table(rows: Sequence[Sequence[str]], head: Sequence[str] = ()) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    lines = [f"<tr>{cells}</tr>"] if head else []
    lines += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows]
    return "<table>\n" + "\n".join(lines) + "\n</table>"


def _published_table(published: Sequence[dict[str, Any]], shown: int = 20) -> str:
    if not published:
        return "<p>No published version.</p>"
    rows = [[f"v{p['version']:06d}", p.get("step", "-"), f"{p.get('samples_seen', 0):,}",
             "-" if p.get("knn_top1") is None else f"{p['knn_top1']:.4f}", p.get("created_at", "-")]
            for p in published[-shown:]]
    more = f"<p>{len(published) - shown} older versions not listed.</p>" if len(published) > shown else ""
    return more + _table(rows, ("version", "step", "samples seen", "kNN top-1", "created"))


STYLE = ("body{font-family:sans-serif;max-width:60em;margin:1em auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}img{max-width:100%}.note{color:#a33}")


def write_report(inputs: ReportInputs, out_dir: Path, index_name: str = "index.html") -> tuple[Path, list[Panel]]:
    """Draws every figure into `out_dir` and writes the page that links them; returns the page and the panels."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = draw_all(inputs, out_dir)
    facts = {**inputs.facts, **summary(inputs.rows)}
    parts = [f"<h1>Run report: {html.escape(facts.get('run dir', ''))}</h1>", _table(list(facts.items())),
             "<h2>Published versions</h2>", _published_table(inputs.published)]
    for figure in figures:
        parts.append(f"<h2>{html.escape(figure.title)}</h2>")
        if figure.note:
            parts.append(f'<p class="note">Not drawn: {html.escape(figure.note)}.</p>')
        else:
            name = html.escape(figure.file)
            parts.append(f'<a href="{name}"><img src="{name}" alt="{html.escape(figure.title)}"></a>')
    if inputs.notes:
        parts += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in inputs.notes) + "</ul>"]
    page = out_dir / index_name
    page.write_text(f"<!doctype html>\n<html><head><meta charset='utf-8'><title>streamssl report</title>"
                    f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n", encoding="utf-8")
    return page, figures
