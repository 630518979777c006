"""Secrets at rest: the SASL password never reaches a file, and what a run dir holds is its owner's alone."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import torch

from streamssl.pipeline.config import load_config, redacted, restore_secrets, secrets_of
from streamssl.pipeline.images import Trainer
from tests.conftest import tiny_config

PASSWORD = "hunter2-do-not-store"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_password_is_in_no_file_and_run_dir_files_are_private(small_lake: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, small_lake, "train.max_steps=2", "train.audit_keys=true",
                      f"kafka.sasl_plain_password={PASSWORD}")
    Trainer(cfg).run()
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert files and not [path for path in files if PASSWORD.encode() in path.read_bytes()]
    checkpoint = torch.load(run_dir / "checkpoints" / "ckpt-000000002.pt", weights_only=True)
    assert checkpoint["config"]["kafka"]["sasl_plain_password"] == ""
    assert _mode(run_dir) == 0o700
    for name in ("config.yaml", "trained-keys.jsonl", "checkpoints/ckpt-000000002.pt"):
        assert _mode(run_dir / name) == 0o600, name
    assert cfg.kafka.client_options()["sasl_plain_password"] == PASSWORD  # the run itself still has it


def test_streamssl_config_prints_no_secret() -> None:
    shown = subprocess.run([sys.executable, "-m", "streamssl.pipeline.cli", "config", "--set",
                            f"kafka.sasl_plain_password={PASSWORD}"], capture_output=True, text=True, check=True)
    assert PASSWORD not in shown.stdout and json.loads(shown.stdout)["kafka"]["sasl_plain_password"] == ""


def test_secrets_travel_apart_from_the_redacted_config() -> None:
    # what pipeline/ray/driver.py does: the config Ray stores is redacted; the workers get the password in memory
    cfg = load_config(sets=[f"kafka.sasl_plain_password={PASSWORD}"])
    worker = load_config(overrides=redacted(cfg))
    assert worker.kafka.sasl_plain_password == ""
    restore_secrets(worker, secrets_of(cfg))
    assert worker.kafka.sasl_plain_password == PASSWORD
