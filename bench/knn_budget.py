"""kNN top-1 of the default run after 5 and 10 minutes of training on this machine.

Runs the real CLI twice on one run dir (`streamssl run --max-minutes 5`, then again, which resumes),
scores each published encoder with `streamssl eval` (full 60k bank, 10k test, k=200, T=0.1), and
scores raw pixels the same way, all in one go. Extra arguments go to `streamssl run`.

    .venv/bin/python bench/knn_budget.py [--minutes 5] [--run-dir DIR] [-- --set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "streamssl.pipeline.cli", *args], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"streamssl {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="budget of each of the two runs")
    parser.add_argument("--run-dir", default="")
    parser.add_argument("run_args", nargs="*", help="passed to `streamssl run` (after --)")
    args = parser.parse_args()
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="streamssl-knn-")
    print(json.dumps({"raw_pixels": json.loads(cli("eval", "--encoder", "raw"))["knn_top1"]}), flush=True)
    for leg in (1, 2):
        stdout = cli("run", "--run-dir", run_dir, "--max-minutes", str(args.minutes), "--metrics-port", "0",
                     *args.run_args)
        done = [line for line in stdout.splitlines() if line.startswith("done:")][-1]
        report = json.loads(cli("eval", "--encoder", str(Path(run_dir) / "published" / "latest")))
        print(json.dumps({"minutes": leg * args.minutes, "step": report["step"],
                          "samples_seen": report["samples_seen"], "knn_top1": report["knn_top1"], "run": done}),
              flush=True)


if __name__ == "__main__":
    main()
