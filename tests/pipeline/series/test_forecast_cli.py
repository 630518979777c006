"""`streamssl forecast` on a small real CSV: one JSON line, exact resume from --run-dir, a published trunk
with its grouping and normalisation, one-line errors; and self-boosted training beats persistence."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from streamssl.models import load_encoder
from streamssl.models.forecaster import build_trunk
from streamssl.pipeline.config import ConfigError, load_config
from streamssl.pipeline.series.forecast import add_parser, forecast, run
from streamssl.streams.records import SourceError

TINY = ["series.window=32", "series.trials=4", "series.max_imfs=3", "eval.every_steps=20", "checkpoint.every_steps=20",
        "series.batch_size=32"]
OLD_CHECKPOINT = Path(__file__).parents[2] / "fixtures" / "forecast-v1-ckpt-000000040.pt"


@pytest.fixture(scope="module")
def series_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two seasonal sines plus noise, 400 points, as a CSV with a time and a value column."""
    t = np.arange(400)
    rng = np.random.default_rng(0)
    values = 20 + 3 * np.sin(2 * np.pi * t / 24) + np.sin(2 * np.pi * t / 7) + 0.3 * rng.standard_normal(len(t))
    hours = np.datetime64("2024-01-01T00", "s") + (3600 * t).astype("timedelta64[s]")
    path = tmp_path_factory.mktemp("series") / "load.csv"
    path.write_text("timestamp,value\n" + "".join(f"{hour},{value}\n" for hour, value in zip(hours, values, strict=True)))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decomposition cache for the module: the series is decomposed once for every test."""
    return tmp_path_factory.mktemp("eemd-cache")


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    parser = argparse.ArgumentParser(prog="streamssl")
    add_parser(parser.add_subparsers(dest="command", required=True))
    assert run(parser.parse_args(argv)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def sets(cache: Path, *extra: str) -> list[str]:
    return [arg for item in (*TINY, f"series.cache_dir={cache}", *extra) for arg in ("--set", item)]


def test_cli_prints_json_and_resumes_exactly(series_csv: Path, cache: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    base = ["forecast", "--series", str(series_csv), "--mode", "combined", "--lag", "6", "--horizon", "2",
            *sets(cache)]
    straight = cli([*base, "--max-steps", "80", "--run-dir", str(tmp_path / "straight")], capsys)
    for key in ("series", "mode", "lag", "horizon", "nrmse", "rmse", "test_points", "groups", "steps", "seconds"):
        assert key in straight
    assert straight["steps"] == 80 and straight["test_points"] > 50 and 0 < straight["nrmse"] < 1
    assert straight["groups"]["aux"] or straight["groups"]["views"]
    assert len(straight["groups"]["correlations"]) == 4 and straight["published"] == 1

    first = cli([*base, "--max-steps", "50", "--run-dir", str(tmp_path / "resumed")], capsys)
    assert first["steps"] == 50 and not first["resumed"]
    second = cli([*base, "--max-steps", "80", "--run-dir", str(tmp_path / "resumed")], capsys)
    assert second["resumed"] and second["steps"] == 80
    for key in ("nrmse", "rmse", "best_step", "best_val_mse", "groups"):
        assert second[key] == straight[key], key
    again = cli([*base, "--max-steps", "80", "--run-dir", str(tmp_path / "resumed")], capsys)  # done: same answer
    assert again["nrmse"] == straight["nrmse"] and again["published"] == second["published"]

    # the checkpoint stores the grouping; the published trunk equals the straight run's, manifest describes inputs
    state = torch.load(sorted((tmp_path / "resumed" / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)
    assert state["groups"]["aux"] == straight["groups"]["aux"]
    folders = [tmp_path / name / "published" / "latest" for name in ("straight", "resumed")]
    weights = [load_file(folder / "encoder.safetensors") for folder in folders]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=0, atol=0)
    manifest = json.loads((folders[1] / "manifest.json").read_text())
    assert manifest["input"]["lag"] == 6 and manifest["input"]["window"] == 32
    assert manifest["input"]["channels"] == 1 + len(straight["groups"]["views"]) == len(manifest["input"]["mean"])
    assert manifest["groups"]["views"] == straight["groups"]["views"]
    assert manifest["metrics"]["nrmse"] == pytest.approx(straight["nrmse"], rel=1e-5)
    # loadable without training code; it z-scores each input channel with the manifest's statistics
    encoder = load_encoder(folders[1])
    raw = torch.randn(2, manifest["input"]["channels"], 6)
    mean, std = (torch.tensor(manifest["input"][key]).view(1, -1, 1) for key in ("mean", "std"))
    trunk = build_trunk("cnn", manifest["input"]["channels"], 6, manifest["embedding_dim"])
    trunk.load_state_dict(weights[1])
    with torch.no_grad():
        torch.testing.assert_close(encoder(raw), trunk((raw - mean) / std))


def test_other_settings_in_the_same_run_dir_are_refused(series_csv: Path, cache: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    base = ["forecast", "--series", str(series_csv), "--max-steps", "20", "--run-dir", str(tmp_path / "run"),
            *sets(cache)]
    cli([*base, "--mode", "single"], capsys)
    with pytest.raises(ConfigError, match="holds a different run"):
        cli([*base, "--mode", "single", "--lag", "3"], capsys)


def test_combined_beats_persistence(series_csv: Path, cache: Path) -> None:
    scores = {}
    for mode in ("persistence", "combined"):
        cfg = load_config(overrides={"data.source": str(series_csv), "forecast.mode": mode, "series.lag": 12,
                                     "series.horizon": 3}, job="forecast",
                          sets=[*TINY, "train.max_steps=400", "eval.every_steps=50", f"series.cache_dir={cache}"])
        scores[mode] = forecast(cfg)["nrmse"]
    # 3 steps ahead of a 7- and 24-point seasonality: persistence is poor, a trained model is much better
    assert scores["combined"] < 0.8 * scores["persistence"], scores


@pytest.mark.parametrize(("argv", "error", "message"), [
    (["--set", "series.value_column=load"], SourceError, "no value column 'load' (columns: timestamp, value)"),
    (["--lag", "0"], ConfigError, "series.lag: must be at least 1"),
    (["--set", "forecast.trunk=gru"], ConfigError, "forecast.trunk: 'gru' is not one of cnn, lstm"),
    (["--set", "series.learning_rate=0.1"], ConfigError, "unknown config key 'series.learning_rate'"),
    (["--set", "augment.blur_prob=0.1"], ConfigError, "augment.blur_prob does not apply to `streamssl forecast`"),
    (["--set", "series.warmup_points=64"], ConfigError, "series.warmup_points does not apply"),
])
def test_bad_arguments_are_one_line_errors(series_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           argv: list[str], error: type[Exception], message: str) -> None:
    with pytest.raises(error) as raised:
        cli(["forecast", "--series", str(series_csv), "--max-steps", "5", *sets(tmp_path), *argv], capsys)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_missing_series_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SourceError, match="series file not found"):
        cli(["forecast", "--series", str(tmp_path / "nope.csv")], capsys)


def test_a_checkpoint_from_before_the_one_loop_resumes_exactly(series_csv: Path, cache: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixture is step 40 of this run, written by the forecast command when it had its own loop and `fit.*`
    keys (fit.eval_every=20, fit.batch_size=32, fit.keep=1, forecast.hidden=8), run next to load.csv."""
    monkeypatch.chdir(series_csv.parent)  # the run's identity holds the series as it was named
    base = ["forecast", "--series", "load.csv", "--mode", "combined", "--lag", "6", "--horizon", "2",
            "--max-steps", "80", *sets(cache, "forecast.hidden=8", "checkpoint.keep=1")]
    straight = cli([*base, "--run-dir", str(tmp_path / "straight")], capsys)
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "ckpt-000000040.pt").write_bytes(OLD_CHECKPOINT.read_bytes())
    resumed = cli([*base, "--run-dir", str(tmp_path / "old")], capsys)
    assert resumed["resumed"] and resumed["steps"] == 80
    for key in ("nrmse", "rmse", "best_step", "best_val_mse", "groups"):
        assert resumed[key] == straight[key], key
