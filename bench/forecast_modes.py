"""The self-boosted paper's comparison, leakage-free: test nRMSE of each mode per series and lag, over seeds.

Nguyen et al. 2019 (arXiv:1909.08181) compare a single-task forecaster with multi-task (auxiliary EEMD
components as extra targets), multi-view (loosely related components as extra inputs) and both
combined, on electricity, exchange-rate and air-temperature series at several lags. This runs the same
grid with `streamssl forecast`'s code in-process: every run uses the series' most recent `--points`
points, the same chronological 70/10/20 split and the same test points, and decompositions of trailing
windows only (cached under ~/.cache/streamssl/eemd, so each series is decomposed once for the whole grid).
Persistence (forecast = last value) is deterministic and runs once per cell. Each run prints a JSON line;
the end prints a Markdown table of nRMSE (RMSE / std of the test targets) mean ± std over seeds.

    .venv/bin/python bench/forecast_modes.py [--series electricity,temperature,exchange] [--lags 1,3,6,12]
        [--modes persistence,single,mtl,mtv,combined] [--seeds 0,1,2] [--points 4000] [--horizon 1]
        [--max-steps 3000] [--max-minutes 2] [--out results.jsonl] [--set series.KEY=V ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from streamssl.models.forecaster import MODES
from streamssl.pipeline.config import load_config
from streamssl.pipeline.series.forecast import forecast


def csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def grid(series: list[str], lags: list[int], modes: list[str], seeds: list[int]) -> list[tuple[str, int, str, int]]:
    """Every run: (series, lag, mode, seed); persistence has no randomness, so it runs with the first seed only."""
    return [(name, lag, mode, seed) for name in series for lag in lags for mode in modes
            for seed in (seeds[:1] if mode == "persistence" else seeds)]


def table(rows: list[dict], series: list[str], lags: list[int], modes: list[str]) -> str:
    """Markdown: one row per (series, lag), one column per mode, nRMSE mean ± std over seeds; best mean in bold."""
    lines = ["| series | lag | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for name in series:
        for lag in lags:
            cells: dict[str, tuple[float, float]] = {}
            for mode in modes:
                scores = [r["nrmse"] for r in rows if (r["series"], r["lag"], r["mode"]) == (name, lag, mode)]
                if scores:
                    cells[mode] = (float(np.mean(scores)), float(np.std(scores)))
            best = min((mean for mean, _ in cells.values()), default=None)
            text = []
            for mode in modes:
                if mode not in cells:
                    text.append("–")
                    continue
                mean, std = cells[mode]
                value = f"{mean:.4f} ± {std:.4f}"
                text.append(f"**{value}**" if mean == best else value)
            lines.append(f"| {name} | {lag} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", default="electricity,temperature,exchange")
    parser.add_argument("--lags", default="1,3,6,12")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--points", type=int, default=4000, help="most recent points of each series")
    parser.add_argument("--horizon", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=3000, help="training steps per run (early stopping may end sooner)")
    parser.add_argument("--max-minutes", type=float, default=2.0, help="training time limit per run")
    parser.add_argument("--out", default="", help="also append every run's JSON line to this file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any key `streamssl forecast` reads (`streamssl config --show --job forecast`)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    series, modes = csv_list(args.series), csv_list(args.modes)
    lags, seeds = [int(lag) for lag in csv_list(args.lags)], [int(seed) for seed in csv_list(args.seeds)]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes: {', '.join(unknown)}")
    rows: list[dict] = []
    started = time.monotonic()
    for name, lag, mode, seed in grid(series, lags, modes, seeds):
        cfg = load_config(overrides={"data.source": name, "forecast.mode": mode, "series.lag": lag,
                                     "series.horizon": args.horizon, "series.points": args.points,
                                     "train.max_steps": args.max_steps, "train.max_minutes": args.max_minutes,
                                     "train.seed": seed}, sets=args.set, job="forecast")
        rows.append(forecast(cfg))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            with Path(args.out).open("a") as out:
                out.write(json.dumps(rows[-1]) + "\n")
    print(f"\nnRMSE (RMSE / std of test targets), horizon {args.horizon}, most recent {args.points} points, "
          f"seeds {','.join(map(str, seeds))}; {time.monotonic() - started:.0f} s in all\n")
    print(table(rows, series, lags, modes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
