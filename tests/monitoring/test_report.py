"""`streamssl report` (pipeline/report.py drawing with monitoring/report*.py): rendered from short real runs, every
image checked to be a real, non-blank PNG linked from the page; run dirs it cannot report on exit 2 in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamssl.monitoring.retrieval_grid import nearest, one_per_class
from streamssl.pipeline.cli import main
from streamssl.pipeline.images import Trainer
from tests.conftest import tiny_config

# The kNN monitor on small subsets (as tests/pipeline/test_cli.py), an eval and a published version every 2 steps.
SHORT = ("train.max_steps=4", "train.log_every_seconds=0", "checkpoint.every_steps=2", "eval.every_steps=2",
         "eval.dataset=fashion-mnist", "eval.bank_size=300", "eval.test_size=100")
METHODS = {  # small enough to cluster within 4 steps of 32
    "deepcluster": ("method=deepcluster", "deepcluster.num_clusters=6", "deepcluster.buffer_size=96"),
    "swav": ("method=swav", "swav.num_prototypes=16", "swav.small_crops=2", "swav.queue_size=0"),
}
ALL = ("loss.png", "knn.png", "throughput.png", "clusters.png", "retrieval.png")


def check_png(path: Path) -> None:
    """A valid PNG of a real size whose pixels are not all one colour."""
    assert path.stat().st_size > 5_000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        assert image.width >= 400 and image.height >= 300, (path, image.size)
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.var() > 0 and len(np.unique(pixels)) > 16, path  # drawn, not blank


def report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["report", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("method", sorted(METHODS))
def test_report_of_a_short_run_draws_every_figure_and_links_them(
        method: str, tmp_path: Path, small_lake: Path, one_thread: None, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    Trainer(tiny_config(run_dir, small_lake, *SHORT, *METHODS[method])).run()
    capsys.readouterr()
    code, out, err = report(capsys, str(run_dir))
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["left_out"] == {}
    folder = run_dir / "report"  # the default --out
    assert sorted(Path(p).name for p in result["images"]) == sorted(ALL)
    for name in ALL:
        check_png(folder / name)
    page = (folder / "index.html").read_text()
    assert set(re.findall(r'<img src="([^"]+)"', page)) == set(ALL)
    assert f"<td>method</td><td>{method}</td>" in page and "<td>steps</td><td>4</td>" in page
    assert "<td>v000002</td><td>4</td><td>128</td>" in page  # the versions published at steps 2 and 4
    assert re.search(r"kNN top-1 0\.\d{4} at step 4 \(raw pixels 0\.\d{4}, untrained encoder 0\.\d{4}\)", page)


def test_report_to_an_html_file_and_notes_for_what_a_run_cannot_show(
        tmp_path: Path, small_lake: Path, one_thread: None, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"  # moco without the kNN monitor: no kNN curve, no eval set, no clusters
    Trainer(tiny_config(run_dir, small_lake, "train.max_steps=3", "train.log_every_seconds=0")).run()
    stale = tmp_path / "out" / "knn.png"  # left by an earlier report: must not pass for this one's
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    capsys.readouterr()
    code, out, err = report(capsys, str(run_dir), "--out", str(tmp_path / "out" / "run.html"))
    assert code == 0, err
    left_out = json.loads(out.strip().splitlines()[-1])["left_out"]
    assert set(left_out) == {"knn.png", "clusters.png", "retrieval.png"}
    assert "moco has no clusters" in left_out["clusters.png"] and "eval.dataset=none" in left_out["retrieval.png"]
    for name in ("loss.png", "throughput.png"):
        check_png(tmp_path / "out" / name)
    assert not stale.exists()
    page = (tmp_path / "out" / "run.html").read_text()
    assert set(re.findall(r'<img src="([^"]+)"', page)) == {"loss.png", "throughput.png"}
    assert page.count('class="note"') == 3


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: None, "run dir not found"),
    (lambda root: root.mkdir(), "no history in"),
    (lambda root: (root.mkdir(), (root / "metrics.jsonl").write_text('{"kind": "progr')), "no history in"),
])
def test_a_run_dir_without_history_exits_2_with_one_line(
        make: object, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    make(root)  # type: ignore[operator]
    code, out, err = report(capsys, str(root))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("streamssl: error: ")
    assert not (root / "report").exists()


def test_nearest_matches_a_full_sort() -> None:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(50, 8))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    queries = bank[[3, 17]] + 0.01 * rng.normal(size=(2, 8))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index, similarity = nearest(queries, bank, 5)
    expected = np.argsort(-(queries @ bank.T), axis=1)[:, :5]
    assert (index == expected).all() and list(index[:, 0]) == [3, 17]
    assert (np.diff(similarity, axis=1) <= 0).all()


def test_queries_cover_as_many_classes_as_there_are() -> None:
    labels = np.array([2, 2, 0, 1, 1, 0, 2])
    assert list(one_per_class(labels, 3)) == [0, 2, 3]
    assert list(one_per_class(labels, 5)) == [0, 1, 2, 3, 4]  # three classes: the next images fill up
