"""One row per method: training samples/s on this machine and kNN top-1 after the same wall-clock budget.

Each method runs the real CLI with its defaults (`streamssl run --method X --max-minutes M`) on the
embedded Fashion-MNIST lake, same backbone, batch and augmentation; the in-run kNN monitor is off so
every method spends its budget training. Each published encoder is then scored by `streamssl eval`
(60k bank, 10k test, k=200, T=0.1), next to raw pixels and a randomly initialised encoder. Rows
print as JSON lines while the script runs, then as a Markdown table.

    .venv/bin/python bench/methods.py [--minutes 5] [--methods moco,swav,...] [-- --set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from streamssl.models.registry import METHODS


class CommandFailed(Exception):
    pass


def cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "streamssl.pipeline.cli", *args], capture_output=True, text=True)
    if result.returncode:
        raise CommandFailed(f"streamssl {' '.join(args)} failed: {result.stderr.strip().splitlines()[-1:]}")
    return result.stdout


def train(method: str, minutes: float, run_dir: Path, extra: list[str]) -> dict[str, float | str]:
    stdout = cli("run", "--method", method, "--run-dir", str(run_dir), "--max-minutes", str(minutes),
                 "--metrics-port", "0", "--set", "eval.every_steps=0", *extra)
    rates = [float(match) for match in re.findall(r"\| (\d+) samples/s \|", stdout)]
    report = json.loads(cli("eval", "--encoder", str(run_dir / "published" / "latest")))
    # The first progress interval includes start-up (loader, first batches): steady state is the rest.
    steady = rates[1:] or rates
    return {"method": method, "samples_per_s": round(sum(steady) / max(len(steady), 1)), "steps": report["step"],
            "samples_seen": report["samples_seen"], "knn_top1": report["knn_top1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget per method")
    parser.add_argument("--methods", default=",".join(sorted(METHODS)))
    parser.add_argument("--keep", default="", help="keep the run dirs (and published encoders) under this folder")
    parser.add_argument("run_args", nargs="*", help="passed to every `streamssl run` (after --)")
    args = parser.parse_args()
    rows: list[dict[str, float | str]] = []
    for baseline in ("raw", "random"):
        top1 = json.loads(cli("eval", "--encoder", baseline))["knn_top1"]
        rows.append({"method": f"({baseline} {'pixels' if baseline == 'raw' else 'encoder'})", "knn_top1": top1})
        print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory(prefix="streamssl-methods-") as scratch:
        root = Path(args.keep or scratch)
        for method in args.methods.split(","):
            try:
                rows.append(train(method, args.minutes, root / method, args.run_args))
            except CommandFailed as err:  # one broken method must not cost the other rows
                rows.append({"method": method, "error": str(err), "knn_top1": float("nan")})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n| method | samples/s | steps in {args.minutes:g} min | kNN top-1 |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row.get('samples_per_s', '—')} | {row.get('steps', '—')} | "
              f"{100 * float(row['knn_top1']):.2f}% |")


if __name__ == "__main__":
    main()
