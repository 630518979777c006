"""Shared by the quality benchmarks: the real CLI as a subprocess, a run bounded by samples seen, the machine.

Quality is compared by samples seen (machines here differ 2x in speed), so a run is `streamssl run
--max-steps ceil(samples / batch)`: its schedule anneals to that budget, as a time-bounded run's does to
its estimated horizon. Wall time is reported next to it.
"""

from __future__ import annotations

import json
import math
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch


class CommandFailed(Exception):
    pass


def cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "streamssl.pipeline.cli", *args], capture_output=True, text=True)
    if result.returncode:
        raise CommandFailed(f"streamssl {' '.join(args)} failed: {result.stderr.strip().splitlines()[-1:]}")
    return result.stdout


def machine() -> dict[str, str]:
    """CPU model and the flags that decide the speed (AVX-512 / bf16 / AMX), torch version and threads."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", lscpu)
    flags = set(re.search(r"Flags:\s*(.+)", lscpu).group(1).split()) if "Flags:" in lscpu else set()
    wanted = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    return {"cpu": model.group(1).strip() if model else platform.processor(), "flags": " ".join(wanted),
            "cores": str(torch.get_num_threads()), "torch": torch.__version__}


def train_samples(method: str, samples: int, run_dir: Path, extra: list[str], batch_size: int = 0) -> dict[str, object]:
    """Trains `method` with its defaults for `samples` samples, then scores the published encoder (full set)."""
    batch = batch_size or int(json.loads(cli("config", "--method", method, *extra))["train"]["batch_size"])
    steps = math.ceil(samples / batch)
    started = time.monotonic()
    stdout = cli("run", "--method", method, "--run-dir", str(run_dir), "--max-steps", str(steps), "--max-minutes", "0",
                 "--metrics-port", "0", "--set", "eval.every_seconds=0", *extra)
    seconds = time.monotonic() - started
    rates = [float(match) for match in re.findall(r"\| (\d+) samples/s \|", stdout)]
    steady = rates[1:] or rates  # the first progress interval includes start-up
    report = json.loads(cli("eval", "--encoder", str(run_dir / "published" / "latest")))
    return {"method": method, "samples_seen": report["samples_seen"], "steps": report["step"],
            "train_seconds": round(seconds), "samples_per_s": round(sum(steady) / max(len(steady), 1)),
            "knn_top1": report["knn_top1"]}


def baselines() -> dict[str, float]:
    """Full-set kNN of raw pixels and of the untrained ConvNet (fed as trained encoders are, and unnormalised)."""
    random = json.loads(cli("eval", "--encoder", "random"))
    return {"raw_pixels": json.loads(cli("eval", "--encoder", "raw"))["knn_top1"], "untrained": random["knn_top1"],
            "untrained_unnormalised_input": random["knn_top1_unnormalised_input"]}
