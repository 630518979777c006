"""`streamssl report RUN_DIR [--out DIR|report.html]`: a run's curves, cluster sizes and retrieval grid as PNG files
and an HTML page that links them beside the run's summary.

This side reads the run dir (metrics.jsonl, config.yaml, published/, checkpoints/) and computes what needs the
encoder (pipeline/report_data.py); monitoring/report.py draws. A missing run dir or one without history is a
RunDirError (one line, exit 2); a part the run cannot supply (no eval set, nothing published, a method without
clusters) is left out of the page with a sentence saying why.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from streamssl.models.registry import SERIES_METHODS
from streamssl.pipeline.config import Config, ConfigError, load_config
from streamssl.pipeline.history import read_history, surviving
from streamssl.pipeline.rundir import RunDirError
from streamssl.streams.files import RunPaths


def add_parser(commands: Any) -> None:
    report = commands.add_parser("report", help="draw a run's loss, kNN, throughput and cluster curves and a "
                                                "retrieval grid as PNG files, with an HTML page linking them")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run dir (reads metrics.jsonl, published/, checkpoints/)")
    report.add_argument("--out", default="", metavar="DIR|FILE.html",
                        help="folder for the PNGs and index.html, or an .html file (PNGs beside it); default RUN_DIR/report/")
    report.add_argument("--queries", type=int, default=8, help="eval images in the retrieval grid")
    report.add_argument("--neighbours", type=int, default=8, help="nearest training images shown per query")


def destination(out: str, run_dir: Path) -> tuple[Path, str]:
    """(folder, page name) of `--out`."""
    if not out:
        return run_dir / "report", "index.html"
    path = Path(out)
    return (path.parent, path.name) if path.suffix.lower() in (".html", ".htm") else (path, "index.html")


def _run_config(paths: RunPaths, notes: list[str]) -> Config | None:
    if not paths.config.is_file():
        notes.append(f"{paths.config} is missing: no retrieval grid and no cluster sizes")
        return None
    try:
        return load_config(str(paths.config))
    except ConfigError as err:  # written by another version of streamssl
        notes.append(f"{paths.config} does not load ({err}): no retrieval grid and no cluster sizes")
        return None


def published_versions(paths: RunPaths) -> list[dict[str, Any]]:
    """version, step, samples_seen, knn_top1 and created_at of each published version, oldest first."""
    versions = []
    folders = sorted(paths.published.glob("v[0-9]*")) if paths.published.is_dir() else []
    for folder in folders:
        try:
            manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # pruned or being written: not a version to list
            continue
        metrics = manifest.get("metrics") or manifest.get("eval") or {}
        versions.append({"version": int(manifest.get("version", 0)), "step": manifest.get("step"),
                         "samples_seen": manifest.get("samples_seen", 0), "knn_top1": metrics.get("knn_top1"),
                         "created_at": manifest.get("created_at", "-")})
    return versions


def run(args: argparse.Namespace) -> int:
    paths = RunPaths(Path(args.run_dir))
    if not paths.root.is_dir():
        raise RunDirError(f"run dir not found: {args.run_dir}")
    rows = read_history(paths.history)
    if not rows:
        raise RunDirError(f"no history in {paths.root}: {paths.history.name} is missing or empty "
                          "(a run writes it from its first progress interval on)")
    if args.queries < 1 or args.neighbours < 1:
        raise ConfigError("--queries and --neighbours must be at least 1")
    try:  # the drawing stack is only needed here
        from streamssl.monitoring.report import ReportInputs, write_report
        from streamssl.pipeline.report_data import cluster_sizes, retrieval
    except ImportError as err:
        raise ConfigError(f"streamssl report needs 'pip install streamssl[report]' ({err.name} is not installed)") from None
    notes: list[str] = []
    cfg = _run_config(paths, notes)
    inputs = ReportInputs(rows=surviving(rows), facts={"run dir": str(paths.root)}, published=published_versions(paths),
                          notes=notes)
    if cfg is not None:
        inputs.facts.update(method=cfg.method, backbone=getattr(getattr(cfg, "model", None), "backbone", "-"))
        sets = None
        if cfg.method in SERIES_METHODS:
            inputs.retrieval = "a series run: there are no images to retrieve"
        elif cfg.eval.dataset != "none":
            from streamssl.pipeline.loading.sources import knn_sets

            sets = knn_sets(cfg.eval)
            inputs.retrieval = retrieval(paths, sets, args.queries, args.neighbours)
        else:
            inputs.retrieval = "the run has no labelled eval set (eval.dataset=none)"
        inputs.clusters = cluster_sizes(paths, cfg, sets)
    out_dir, page_name = destination(args.out, paths.root)
    page, figures = write_report(inputs, out_dir, page_name)
    print(json.dumps({"report": str(page), "images": [str(out_dir / f.file) for f in figures if not f.note],
                      "left_out": {f.file: f.note for f in figures if f.note}}))
    return 0
