"""The Python API: a short run driven from Python, stopped from another thread, its callbacks at the right steps."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamssl.pipeline import api
from tests.conftest import tiny_sets


def test_load_config_spellings(tmp_path: Path) -> None:
    file = tmp_path / "run.yaml"
    file.write_text("method: simclr\ntrain: {batch_size: 64}\n")
    cfg = api.load_config(str(file), train__max_steps=7, data={"size": 32}, **{"optim.lr": 0.5})
    assert (cfg.method, cfg.train.batch_size, cfg.train.max_steps, cfg.data.size, cfg.optim.lr) == (
        "simclr", 64, 7, 32, 0.5)
    with pytest.raises(api.ConfigError, match=r"did you mean train\.max_steps"):
        api.load_config(train__max_stepz=1)


def test_run_refuses_a_ray_source(tmp_path: Path) -> None:
    with pytest.raises(api.ConfigError, match="--workers"):
        api.run(api.load_config(data__source=f"ray+webdataset://{tmp_path}"))


@pytest.mark.usefixtures("one_thread")
def test_a_run_from_python_stopped_from_another_thread(tmp_path: Path, small_lake: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    sets = tiny_sets(run_dir, small_lake, "eval.dataset=fashion-mnist", "eval.bank_size=300", "eval.test_size=100")
    cfg = api.load_config(**{key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in sets)})
    assert (cfg.train.max_steps, cfg.train.max_minutes) == (0, 0)  # unbounded: only `stop` ends it
    steps: list[int] = []
    evals: list[tuple[int, dict[str, float]]] = []
    checkpoints: list[tuple[int, Path]] = []
    publishes: list[tuple[int, int, Path]] = []
    reached, stop = threading.Event(), threading.Event()

    def on_step(step: int, loss: float, logs: dict[str, float]) -> None:
        steps.append(step)
        assert loss == loss and "queue_fill" in logs
        if step == 4:
            reached.set()
        if step == 2:
            raise RuntimeError("a bug in the caller's callback")

    callbacks = api.Callbacks(on_step=on_step, on_eval=lambda step, metrics: evals.append((step, metrics)),
                              on_checkpoint=lambda step, path: checkpoints.append((step, path)),
                              on_publish=lambda step, version, folder: publishes.append((step, version, folder)))
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(state=api.run(cfg, callbacks, stop=stop)))
    with caplog.at_level(logging.WARNING):
        runner.start()
        assert reached.wait(120), "the run never reached step 4"
        stop.set()  # from this thread, as a notebook's "stop" button would
        runner.join(120)
    assert not runner.is_alive()
    state = result["state"]
    last = state.step
    assert last >= 4 and steps == list(range(1, last + 1))  # every counted step, once, in order
    assert "callback on_step raised RuntimeError: a bug in the caller's callback; the run goes on" in caplog.text
    # checkpoint.every_steps=2, and the final one; each path is the checkpoint of its step, durable
    assert [step for step, _ in checkpoints] == [*range(2, last + 1, 2), *([last] if last % 2 else [])]
    assert all(path.is_file() and path.name == f"ckpt-{step:09d}.pt" for step, path in checkpoints)
    # publish after every checkpoint; each version's manifest is of its step and of the eval just before it
    assert [(step, version) for step, version, _ in publishes] == [(step, n) for n, (step, _) in enumerate(checkpoints, 1)]
    for step, version, folder in publishes:
        manifest = json.loads((folder / "manifest.json").read_text())
        assert (manifest["step"], manifest["version"]) == (step, version)
        assert dict(evals)[step]["knn_top1"] == manifest["metrics"]["knn_top1"]
    assert [step for step, _ in evals] == [step for step, _, _ in publishes]
    assert api.load_encoder(run_dir / "published" / "latest").manifest["step"] == last
