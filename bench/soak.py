"""Soak: one unbounded follow-mode run while shards keep landing; memory, open files, run-dir disk use and the
checkpoint stall, sampled over the whole run and printed next to their goals.

    python bench/soak.py --minutes 30

The trainer runs with its defaults (the kNN monitor every 2 minutes, a checkpoint and a publish every
5 minutes) except `--checkpoint-seconds`; a writer adds one shard of 128 Fashion-MNIST images every
`--shard-seconds`. Its RSS (trainer + loader process) is compared between the first sample after warm-up
and the last one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.lake import build_lake, write_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import free_port

SHARD = 128


def _rss_mb(pid: int) -> float:
    """Resident memory of the process and its children (the loader process), in MB."""
    total = 0.0
    for proc in [pid, *_children(pid)]:
        try:
            status = Path(f"/proc/{proc}/status").read_text()
        except OSError:
            continue
        total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _open_files(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{proc}/fd")) for proc in [pid, *_children(pid)] if os.path.exists(f"/proc/{proc}/fd"))


def _du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    wanted = ("streamssl_checkpoint_duration_seconds_sum", "streamssl_checkpoint_duration_seconds_count",
              "streamssl_step_duration_seconds_sum", "streamssl_steps_total", "streamssl_samples_total")
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = float(value)
    return values


def _land_shards(lake: Path, stop: threading.Event, every: float) -> None:
    images, _ = load_fashion_mnist("train")
    index = len(list(lake.glob("*.tar")))
    while not stop.wait(every):
        start = (index * SHARD) % (len(images) - SHARD)
        write_shard(lake / f"shard-{index:06d}.tar",
                    [(f"soak-{index:06d}-{i:03d}", {"png": _png(images[start + i])}) for i in range(SHARD)])
        index += 1


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--shard-seconds", type=float, default=20.0, help="one new shard of 128 images this often")
    parser.add_argument("--checkpoint-seconds", type=float, default=60.0)
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--samples-out", default="", help="also write every sample to this CSV file")
    args = parser.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("Flags")), [])
    print(f"machine: {platform.node()} | {model} | {os.cpu_count()} CPUs | "
          + " ".join(f for f in flags if f.startswith(("avx512", "avx2", "amx"))))
    with tempfile.TemporaryDirectory() as tmp:
        lake, run_dir, port = Path(tmp) / "lake", Path(tmp) / "run", free_port()
        images, labels = load_fashion_mnist("train")
        build_lake(lake, images[:4 * SHARD], labels[:4 * SHARD], shard_size=SHARD)
        stop = threading.Event()
        writer = threading.Thread(target=_land_shards, args=(lake, stop, args.shard_seconds), daemon=True)
        writer.start()
        log = open(Path(tmp) / "stderr.log", "w")  # noqa: SIM115 (open for the trainer's whole life)
        process = subprocess.Popen(
            [sys.executable, "-m", "streamssl.pipeline.cli", "run", "--data", str(lake), "--run-dir", str(run_dir),
             "--max-minutes", str(args.minutes), "--metrics-port", str(port),
             f"--set=checkpoint.every_seconds={args.checkpoint_seconds}", "--set=data.mode=follow"],
            stdout=subprocess.DEVNULL, stderr=log)
        samples: list[tuple[float, float, int, float]] = []
        started = time.monotonic()
        last: dict[str, float] = {}
        trained_at = float("inf")  # when the first step was seen: start-up (imports, baselines) is not the steady state
        while process.poll() is None:
            time.sleep(args.sample_seconds)
            if process.poll() is not None:
                break
            samples.append((time.monotonic() - started, _rss_mb(process.pid), _open_files(process.pid), _du_mb(run_dir)))
            with contextlib.suppress(OSError):
                last = _scrape(port)
            if last.get("streamssl_steps_total", 0) > 0:
                trained_at = min(trained_at, samples[-1][0])
        stop.set()
        code = process.wait()
        print(f"exit code {code}; {len(samples)} samples over {samples[-1][0] / 60:.1f} min" if samples else f"exit {code}")
        if args.samples_out:
            Path(args.samples_out).write_text("seconds,rss_mb,open_files,run_dir_mb\n" + "".join(
                f"{t:.0f},{rss:.1f},{fds},{du:.2f}\n" for t, rss, fds, du in samples))
        # After warm-up (a minute past the first step); memory compared by the minimum of each window, so that an
        # eval's transient peak does not count.
        print(f"first step seen after {trained_at:.0f} s; warm-up ends a minute later")
        # ... and before the budget ends (the final eval, checkpoint and publish, the loader already gone, are shutdown).
        samples = [s for s in samples if trained_at + 60 <= s[0] < 60 * args.minutes] or samples
        window = max(1, len(samples) // 5)
        warm = min(samples[:window], key=lambda s: s[1])
        end = min(samples[-window:], key=lambda s: s[1])
        stall = last.get("streamssl_checkpoint_duration_seconds_sum", 0.0) / max(
            1e-9, last.get("streamssl_step_duration_seconds_sum", 0.0))
        print("| measure | value | goal | met |\n|---|---|---|---|")
        rss = end[1] - warm[1]
        print(f"| RSS growth, first → last fifth of the run, lowest of each (trainer + loader) | {rss:+.1f} MB "
              f"({warm[1]:.0f} → {end[1]:.0f}) | < 50 MB | {'yes' if rss < 50 else 'no'} |")
        print(f"| open files (min / max after warm-up) | {min(s[2] for s in samples)} / {max(s[2] for s in samples)} | "
              f"flat | {'yes' if max(s[2] for s in samples) - min(s[2] for s in samples) <= 4 else 'no'} |")
        print(f"| run-dir disk use (min / max) | {min(s[3] for s in samples):.1f} / {max(s[3] for s in samples):.1f} MB "
              f"| bounded by retention | see published/ |")
        print(f"| checkpoint seconds ÷ step seconds | {stall:.2%} "
              f"({last.get('streamssl_checkpoint_duration_seconds_count', 0):.0f} checkpoints, "
              f"{last.get('streamssl_steps_total', 0):.0f} steps) | < 5% | {'yes' if stall < 0.05 else 'no'} |")
        print(f"published versions: {len(list((run_dir / 'published').glob('v*')))}; "
              f"checkpoints kept: {len(list((run_dir / 'checkpoints').glob('ckpt-*.pt')))}; "
              f"samples trained: {last.get('streamssl_samples_total', 0):.0f}")


if __name__ == "__main__":
    main()
