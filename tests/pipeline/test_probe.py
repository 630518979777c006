"""Linear probe and few-label fine-tuning: stratified label fractions, and accuracies that track the features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from streamssl.models import build_backbone
from streamssl.pipeline.cli import main
from streamssl.pipeline.evaluation.probe import fine_tune, labelled_fraction, linear_probe

CPU = torch.device("cpu")


def _quadrant_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 16x16 noise images whose label is the quadrant that is brighter: linearly separable."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(4, (count,), generator=gen)
    images = torch.randint(0, 120, (count, 1, 16, 16), generator=gen, dtype=torch.uint8)
    for label, (rows, cols) in enumerate([(slice(0, 8), slice(0, 8)), (slice(0, 8), slice(8, 16)),
                                          (slice(8, 16), slice(0, 8)), (slice(8, 16), slice(8, 16))]):
        images[labels == label, :, rows, cols] += 120
    return images, labels


def _half_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Label 0: the top half is brighter, 1: the bottom half; survives crops and horizontal flips."""
    images, quadrant = _quadrant_images(count, seed)
    labels = quadrant // 2
    images[:, :, :8][labels == 0] = images[:, :, :8][labels == 0].clamp(min=120)
    images[:, :, 8:][labels == 1] = images[:, :, 8:][labels == 1].clamp(min=120)
    return images, labels


def test_labelled_fraction_is_stratified_and_reproducible() -> None:
    labels = np.repeat(np.arange(10), [600, 300, 50, 1, 1000, 10, 20, 30, 40, 100])
    picked = labelled_fraction(labels, 0.1, seed=3)
    counts = np.bincount(labels[picked], minlength=10)
    assert counts.tolist() == [60, 30, 5, 1, 100, 1, 2, 3, 4, 10]  # round(10%), at least one per class
    assert len(np.unique(picked)) == len(picked)
    assert np.array_equal(picked, labelled_fraction(labels, 0.1, seed=3))
    assert not np.array_equal(picked, labelled_fraction(labels, 0.1, seed=4))


def test_linear_probe_separates_separable_features_and_not_random_labels() -> None:
    train, train_labels = _quadrant_images(800, seed=0)
    test, test_labels = _quadrant_images(400, seed=1)
    separable = linear_probe(nn.Flatten(), train, train_labels, test, test_labels, CPU, steps=300)
    shuffled = linear_probe(nn.Flatten(), train, train_labels[torch.randperm(800)], test, test_labels, CPU, steps=300)
    assert separable > 0.95
    assert shuffled < 0.45  # chance is 0.25: labels the features do not explain are not learned


def test_fine_tune_learns_from_few_labels_and_leaves_the_encoder_untouched() -> None:
    torch.manual_seed(0)
    encoder = build_backbone("convnet", 1)[0]
    before = {name: value.clone() for name, value in encoder.state_dict().items()}
    train, train_labels = _half_images(64, seed=0)
    test, test_labels = _half_images(400, seed=1)
    top1 = fine_tune(encoder, train, train_labels, test, test_labels, CPU, steps=60, batch_size=32)
    assert top1 > 0.9
    assert all(torch.equal(before[name], value) for name, value in encoder.state_dict().items())


def test_cli_linear_probe_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "--encoder", "raw", "--linear", "--bank-size", "2000", "--test-size", "500", "--steps", "200"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["protocol"] == "linear" and result["train_labels"] == 2000 and result["test_size"] == 500
    assert 0.6 < result["linear_top1"] <= 1.0  # raw Fashion-MNIST pixels are far above the 10% of chance


def test_cli_fine_tune_with_one_percent_of_labels(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["eval", "--encoder", "random", "--labels", "0.01", "--test-size", "500", "--steps", "30"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["train_labels"] == 600 and result["protocol"] == "fine-tune"
    assert 0.3 < result["fine_tune_top1"] <= 1.0


@pytest.mark.parametrize("argv", [["--encoder", "raw", "--labels", "0.1"], ["--encoder", "random", "--labels", "2"]])
def test_cli_refuses_bad_label_requests_in_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("streamssl: error: ")
