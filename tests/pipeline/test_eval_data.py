"""`eval.data`: the kNN monitor and `streamssl eval` on the user's own labelled shards (pipeline/evaluation/eval_data.py).

The labelled lake is synthetic but real shards: four classes of 28 x 28 grey patterns (horizontal stripes, vertical
stripes, a bright centre, a bright frame) under per-image noise and brightness, written as PNG + JSON records the
way `streamssl lake` writes them, with a few bad records mixed in.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from streamssl.pipeline.cli import main
from streamssl.pipeline.config import ConfigError, load_config
from streamssl.pipeline.config_show import describe
from streamssl.pipeline.evaluation.eval_data import QUERY_SHARE, read_eval_shards
from streamssl.pipeline.evaluation.knn import knn_top1
from streamssl.pipeline.images import Trainer
from streamssl.pipeline.loading.decode import record_id
from streamssl.streams.lake import png_bytes, write_shard
from tests.conftest import tiny_config

CLASSES = ("stripes-across", "stripes-down", "centre", "frame")
PER_CLASS = 60


def pattern(label: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class `label`: its pattern at a random brightness, plus noise."""
    image = np.zeros((28, 28))
    if label == 0:
        image[::4] = 1
    elif label == 1:
        image[:, ::4] = 1
    elif label == 2:
        image[9:19, 9:19] = 1
    else:
        image[:3], image[-3:], image[:, :3], image[:, -3:] = 1, 1, 1, 1
    image = image * rng.uniform(120, 255) + rng.normal(0, 25, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_labelled_lake(directory: Path, *, text_labels: bool = False, bad: bool = True) -> list[str]:
    """Shards of PER_CLASS images per class (keys interleaved by class), 3 shards; with `bad`, 2 undecodable images,
    2 JSON members without "label" and 1 record without JSON. `text_labels`: the label is a `cls` text member
    holding the class name instead. Returns the good records' keys."""
    rng = np.random.default_rng(0)
    records: list[tuple[str, dict[str, bytes]]] = []
    for index in range(PER_CLASS * len(CLASSES)):
        label = index % len(CLASSES)
        fields = {"png": png_bytes(pattern(label, rng))}
        if text_labels:
            fields["cls"] = CLASSES[label].encode()
        else:
            fields["json"] = json.dumps({"label": label, "index": index}).encode()
        records.append((f"sample-{index:05d}", fields))
    good = [key for key, _ in records]
    if bad:
        records += [(f"corrupt-{n}", {"png": b"not a png", "json": b'{"label": 1}'}) for n in range(2)]
        records += [(f"unlabelled-{n}", {"png": png_bytes(pattern(0, rng)), "json": b'{"index": 7}'}) for n in range(2)]
        records.append(("no-json", {"png": png_bytes(pattern(1, rng))}))
    directory.mkdir(parents=True, exist_ok=True)
    third = len(records) // 3 + 1
    for number in range(3):
        write_shard(directory / f"shard-{number:06d}.tar", records[number * third:(number + 1) * third])
    return good


@pytest.fixture(scope="module")
def labelled_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lake = tmp_path_factory.mktemp("labelled")
    write_labelled_lake(lake)
    return lake


def test_split_is_by_key_hash_bad_records_are_counted_and_caps_keep_the_lowest_hashes(labelled_lake: Path) -> None:
    keys = [f"sample-{index:05d}" for index in range(PER_CLASS * len(CLASSES))]
    sets = read_eval_shards(str(labelled_lake), "json:label", 0, 0, "png", 1, 28)
    assert sets.skipped == {"corrupt_image": 2, "missing_label": 3}
    assert set(sets.query_keys) == {key for key in keys if record_id(key) % QUERY_SHARE == 0}
    assert set(sets.bank_keys) == set(keys) - set(sets.query_keys)
    assert 0.1 < len(sets.query_keys) / len(keys) < 0.3  # about a fifth
    assert sets.bank_images.shape == (len(sets.bank_keys), 1, 28, 28) and sets.bank_images.dtype == torch.uint8
    assert sets.classes == ["0", "1", "2", "3"]
    assert [int(key[-5:]) % 4 for key in sets.bank_keys] == sets.bank_labels.tolist()  # labels stay with images

    capped = read_eval_shards(str(labelled_lake), "json:label", 50, 10, "png", 1, 28)
    assert capped.bank_keys == sorted(sets.bank_keys, key=record_id)[:50]
    assert capped.query_keys == sorted(sets.query_keys, key=record_id)[:10]
    again = read_eval_shards(str(labelled_lake), "json:label", 50, 10, "png", 1, 28)
    assert torch.equal(again.bank_images, capped.bank_images) and again.query_keys == capped.query_keys


def test_text_labels_in_a_cls_member(tmp_path: Path) -> None:
    write_labelled_lake(tmp_path, text_labels=True, bad=False)
    sets = read_eval_shards(str(tmp_path), "cls", 0, 0, "png", 1, 28)
    assert sets.classes == sorted(CLASSES) and not sets.skipped
    assert {sets.classes[label] for label in sets.query_labels.tolist()} == set(CLASSES)


@pytest.mark.parametrize(("label_field", "message"), [
    ("cls", "eval.label_field cls: no record in {lake} has it (245 records read; their members: json, png)"),
    ("json:class", "eval.label_field json:class: no record in {lake} has it"),
])
def test_a_label_field_no_record_has_is_one_error(labelled_lake: Path, label_field: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message.format(lake=labelled_lake))):
        read_eval_shards(str(labelled_lake), label_field, 0, 0, "png", 1, 28)


def test_raw_pixel_knn_on_the_shards_is_far_above_chance(labelled_lake: Path) -> None:
    sets = read_eval_shards(str(labelled_lake), "json:label", 0, 0, "png", 1, 28)
    top1 = knn_top1(torch.nn.Flatten(), *sets.tensors(), [0.0], [1.0], torch.device("cpu"), k=20)
    assert top1 > 0.9  # chance: 0.25


def test_config_show_documents_the_keys_and_channels_other_than_one_are_allowed(labelled_lake: Path) -> None:
    lines = describe("moco", "images")
    assert any(line.startswith("eval.data = ''  # a directory of labelled WebDataset shards") for line in lines)
    assert any(line.startswith("eval.label_field = json:label  # ") for line in lines)
    assert any(line.startswith("drift.window = 512  # records in each window") for line in lines)
    load_config(sets=["data.channels=3", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
                      f"eval.data={labelled_lake}"])
    with pytest.raises(ConfigError, match=re.escape("eval.label_field: expected MEMBER")):
        load_config(sets=["eval.label_field=:label"])


def test_the_in_run_monitor_scores_the_users_shards(tmp_path: Path, small_lake: Path, labelled_lake: Path,
                                                    one_thread: None) -> None:
    cfg = tiny_config(tmp_path / "run", small_lake, "train.max_steps=2", f"eval.data={labelled_lake}",
                      "eval.dataset=none")  # eval.data replaces eval.dataset, even none
    trainer = Trainer(cfg)
    trainer.run()
    metrics = trainer.state.eval_metrics
    assert metrics["knn_top1"] > 0.75 and metrics["knn_raw_pixels"] > 0.9, metrics  # 4 classes: chance 0.25
    assert json.loads((tmp_path / "run" / "knn-baselines.json").read_text())["settings"]["eval_data_digest"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamssl.pipeline.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_streamssl_eval_data_reports_knn_on_the_shards(labelled_lake: Path) -> None:
    result = _cli("eval", "--encoder", "random", "--data", str(labelled_lake), "--k", "20")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dataset"] == str(labelled_lake) and report["classes"] == 4
    assert report["skipped"] == {"corrupt_image": 2, "missing_label": 3}
    assert report["bank_size"] + report["test_size"] == PER_CLASS * len(CLASSES)
    assert report["knn_top1"] > 0.75


@pytest.mark.parametrize(("args", "message"), [
    (["eval", "--encoder", "raw", "--data", "/nonexistent/labelled"], "eval.data: directory not found"),
    (["eval", "--encoder", "raw", "--data", "{lake}", "--label-field", "cls"], "eval.label_field cls: no record"),
])
def test_eval_given_a_missing_dir_or_label_field_says_one_line_exit_2(labelled_lake: Path, args: list[str], message: str,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main([arg.format(lake=labelled_lake) for arg in args]) == 2  # the command's own entry point, in-process
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and not captured.out, captured.err


def test_run_given_a_missing_eval_dir_refuses_before_writing_anything(tmp_path: Path, small_lake: Path) -> None:
    result = _cli("run", "--data", str(small_lake), "--set", "eval.data=/nonexistent/labelled", "--run-dir",
                  str(tmp_path / "run"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "eval.data: directory not found: /nonexistent/labelled" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()
