"""The replay buffer's own cost per training step, alone: `refresh` (the replayed records' new features) and `add`
(the arrivals), the batched form in pipeline/replay.py vs the one-arrival-at-a-time loop it replaced (the oracle
of tests/pipeline/test_replay_equivalence.py), on a full buffer, as pipeline/images.py calls them.

    cd bench && ../.venv/bin/python replay_add.py [--capacity 4096] [--arrivals 32] [--dim 256] [--steps 30]
        [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from runs import machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.pipeline: the loop, kept as the oracle
from streamssl.pipeline.replay import ReplayBuffer
from tests.pipeline.test_replay_equivalence import LoopReplayBuffer


def step_times(buf: ReplayBuffer, steps: int, arrivals: int, dim: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds of refresh and add per step, on a seeded stream of Gaussian features."""
    generator = torch.Generator().manual_seed(1)
    images = torch.zeros(arrivals, *buf.images.shape[1:], dtype=torch.uint8, device=device)
    ids = torch.arange(arrivals, device=device)
    refresh, add = [], []
    for _ in range(steps):
        replayed = torch.randn(arrivals, dim, generator=generator).to(device)
        arriving = torch.randn(arrivals, dim, generator=generator).to(device)
        slots = buf.draw(arrivals)
        started = time.perf_counter()
        buf.refresh(slots, replayed)
        synchronize(device)
        middle = time.perf_counter()
        buf.add(images, ids, arriving)
        synchronize(device)
        refresh.append(middle - started)
        add.append(time.perf_counter() - middle)
    return {"refresh_ms": round(1e3 * statistics.median(refresh), 2), "add_ms": round(1e3 * statistics.median(add), 2)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--arrivals", type=int, default=32, help="arriving (and replayed) records per step")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(json.dumps({**machine(), "device": str(device)}), flush=True)
    for policy in ("fifo", "reservoir", "minred"):
        filled = ReplayBuffer(args.capacity, policy, (1, 28, 28), args.dim, 0, device)  # type: ignore[arg-type]
        filled.add(torch.zeros(args.capacity, 1, 28, 28, dtype=torch.uint8, device=device),
                   torch.arange(args.capacity, device=device), torch.randn(args.capacity, args.dim).to(device))
        row: dict[str, object] = {"policy": policy, "capacity": args.capacity, "arrivals": args.arrivals,
                                  "dim": args.dim, "threads": args.threads}
        for name, kind in (("loop", LoopReplayBuffer), ("batched", ReplayBuffer)):
            buf = kind(args.capacity, policy, (1, 28, 28), args.dim, 0, device)  # type: ignore[arg-type]
            buf.load_state_dict(filled.state_dict())  # the same full buffer and stream for both
            row[name] = step_times(buf, args.steps, args.arrivals, args.dim, device)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
