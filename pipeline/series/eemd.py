"""Rolling EEMD: the decomposition of every trailing window of a series, fast enough for one window per time step.

Ensemble EMD (Wu & Huang 2009, "Ensemble Empirical Mode Decomposition: a noise-assisted data analysis
method") averages the IMFs of `trials` EMDs (Huang et al. 1998) of the signal plus white noise. The
self-boosted forecaster (Nguyen et al. 2019, arXiv:1909.08181) needs it for EVERY forecast origin, on the
trailing window only (EEMD is not causal), i.e. thousands of short windows. PyEMD does one window per call
and starts a new process pool per call; here the sifting of many (window x trial) rows runs at once as
numpy array operations (`batched_emd`, pipeline/series/emd.py), over one process pool that lives as long as
the `RollingEEMD`.

Components of a window, [max_imfs + 1, W]: the ensemble mean of IMF 1..max_imfs over ALL trials (a trial
without IMF k contributes zeros, PyEMD instead averages only the trials that have it and mixes residues into
IMF rows), then the residue = window - sum of the IMFs, so the components always add up to the window.
CEEMDAN (Torres et al. 2011) runs PyEMD's `CEEMDAN` per window in the pool (no batched version).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import weakref
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from streamssl.pipeline.extras import require
from streamssl.pipeline.series.emd import batched_emd

ROWS_PER_BLOCK = 2048  # (window x trial) rows sifted together: smaller arrays stay in cache, larger amortise overhead

METHODS = ("eemd", "ceemdan")
BACKENDS = ("auto", "batched", "pyemd")


# ---------------------------------------------------------------- ensembles per window


def window_generator(window: np.ndarray, seed: int) -> np.random.Generator:
    """A generator that depends only on the seed and the window's values (not on its batch or position)."""
    digest = hashlib.blake2b(np.ascontiguousarray(window, dtype=np.float64).tobytes(), digest_size=16).digest()
    return np.random.default_rng([seed, *np.frombuffer(digest, dtype=np.uint32).tolist()])


def window_noise(window: np.ndarray, seed: int, trials: int, noise_width: float) -> np.ndarray:
    """EEMD's white noise for one window, [trials, W]: std = noise_width * (max - min), as PyEMD's EEMD."""
    scale = noise_width * float(np.max(window) - np.min(window))
    if scale == 0.0:
        return np.zeros((trials, len(window)))
    return window_generator(window, seed).standard_normal((trials, len(window))) * scale


def _eemd_batched(windows: np.ndarray, trials: int, noise_width: float, max_imfs: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble-mean components [n, max_imfs + 1, W] and IMF counts (most over trials) of windows [n, W]."""
    n, width = windows.shape
    noisy = np.stack([window + window_noise(window, seed, trials, noise_width) for window in windows])
    imfs, counts = batched_emd(noisy.reshape(n * trials, width), max_imfs)
    return _components(windows, imfs.reshape(n, trials, max_imfs, width).mean(axis=1)), counts.reshape(n, trials).max(1)


def _eemd_pyemd(windows: np.ndarray, trials: int, noise_width: float, max_imfs: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Same as `_eemd_batched` (same noise, same averaging) with PyEMD's EMD sifting each trial."""
    from PyEMD import EMD  # only where this backend runs

    emd = EMD()
    n, width = windows.shape
    mean_imfs, counts = np.zeros((n, max_imfs, width)), np.zeros(n, dtype=np.intp)
    for i, window in enumerate(windows):
        for noise in window_noise(window, seed, trials, noise_width):
            emd.emd(window + noise, max_imf=max_imfs)
            imfs, _ = emd.get_imfs_and_residue()
            mean_imfs[i, :len(imfs)] += imfs
            counts[i] = max(counts[i], len(imfs))
    return _components(windows, mean_imfs / trials), counts


def _ceemdan_pyemd(windows: np.ndarray, trials: int, noise_width: float, max_imfs: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """PyEMD's CEEMDAN (epsilon = noise_width) of each window, its noise seeded from the seed and the window."""
    from PyEMD import CEEMDAN

    n, width = windows.shape
    imfs, counts = np.zeros((n, max_imfs, width)), np.zeros(n, dtype=np.intp)
    for i, window in enumerate(windows):
        ceemdan = CEEMDAN(trials=trials, epsilon=noise_width, parallel=False)
        ceemdan.noise_seed(int(window_generator(window, seed).integers(2 ** 32)))
        found = ceemdan.ceemdan(window, max_imf=max_imfs)[:-1][:max_imfs]  # its last row is the residue
        imfs[i, :len(found)] = found
        counts[i] = len(found)
    return _components(windows, imfs), counts


def _components(windows: np.ndarray, imfs: np.ndarray) -> np.ndarray:
    """[n, K, W] IMFs + the residue that makes them add up to the windows -> [n, K + 1, W]."""
    return np.concatenate([imfs, (windows - imfs.sum(axis=1))[:, None, :]], axis=1)


def _decompose_block(task: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Pool worker: (engine name, windows, trials, noise_width, max_imfs, seed) -> (components, counts)."""
    engine, windows, *settings = task
    return _ENGINES[engine](windows, *settings)


_ENGINES = {"batched": _eemd_batched, "pyemd": _eemd_pyemd, "ceemdan": _ceemdan_pyemd}


# ---------------------------------------------------------------- public API


class RollingEEMD:
    """EEMD (or CEEMDAN) of many windows, deterministic per window, over one reused process pool.

    Args:
        method: "eemd" or "ceemdan" (CEEMDAN runs PyEMD's implementation, backend "pyemd" only).
        trials: ensemble size (noise realisations per window).
        noise_width: EEMD: noise std relative to the window's range (PyEMD's noise_width); CEEMDAN: PyEMD's epsilon.
            0 with trials=1 is plain EMD.
        max_imfs: IMFs per window; components are IMF 1..max_imfs then the residue.
        processes: worker processes (0 = os.cpu_count()); 1 = no pool, everything in this process.
            Results do not depend on it.
        seed: noise seed; a window's noise depends only on it and the window's values.
        backend: "batched" (vectorised sifting, `batched_emd`), "pyemd" (PyEMD's EMD per trial; the
            reference), "auto" = batched for EEMD, pyemd for CEEMDAN. `self.backend` holds the resolved name.
    """

    def __init__(self, *, method: str = "eemd", trials: int = 50, noise_width: float = 0.05, max_imfs: int = 4,
                 processes: int = 0, seed: int = 0, backend: str = "auto") -> None:
        if method not in METHODS:
            raise ValueError(f"decomposition method {method!r} is not one of {', '.join(METHODS)}")
        if backend not in BACKENDS:
            raise ValueError(f"EEMD backend {backend!r} is not one of {', '.join(BACKENDS)}")
        if method == "ceemdan" and backend == "batched":
            raise ValueError("CEEMDAN has no batched backend: use backend='pyemd' or 'auto'")
        if trials < 1 or max_imfs < 1 or processes < 0 or seed < 0 or not noise_width >= 0:
            raise ValueError(f"EEMD needs trials >= 1, max_imfs >= 1, processes >= 0, seed >= 0, noise_width >= 0; "
                             f"got {trials}, {max_imfs}, {processes}, {seed}, {noise_width}")
        self.method, self.trials, self.noise_width, self.max_imfs, self.seed = method, trials, noise_width, max_imfs, seed
        self.processes = processes or os.cpu_count() or 1
        self.backend = ("pyemd" if method == "ceemdan" else "batched") if backend == "auto" else backend
        if self.backend == "pyemd":  # here, not in a pool worker, so that a missing PyEMD is one line
            require("PyEMD", "series", "CEEMDAN (or the pyemd EEMD backend)")
        self._pool: ProcessPoolExecutor | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def pool(self) -> ProcessPoolExecutor | None:
        """The worker pool, started on first use and kept until `close()`; None when processes == 1."""
        if self._pool is None and self.processes > 1:
            # spawn: workers must not inherit a parent's threads or locks (torch, Kafka clients)
            pool = self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))
            self._finalizer = weakref.finalize(self, pool.shutdown, wait=False, cancel_futures=True)
        return self._pool

    def decompose(self, windows: np.ndarray, *, return_counts: bool = False):
        """Components [N, max_imfs + 1, W] (IMF 1..max_imfs, then the residue) of windows [N, W].

        `components.sum(axis=1)` equals the windows (up to rounding). With `return_counts`, also the number
        of IMFs of each window ([N] int; EEMD: the most any trial had), zero-padded components beyond it.
        """
        windows = _checked_windows(windows)
        engine = "ceemdan" if self.method == "ceemdan" else self.backend
        per_block = max(1, ROWS_PER_BLOCK // self.trials) if engine == "batched" else 1
        if self.processes > 1:  # at least one block per worker, so that every core has work
            per_block = max(1, min(per_block, -(-len(windows) // self.processes)))
        tasks = [(engine, windows[i:i + per_block], self.trials, self.noise_width, self.max_imfs, self.seed)
                 for i in range(0, len(windows), per_block)]
        if not tasks:
            empty = np.zeros((0, self.max_imfs + 1, windows.shape[1]))
            return (empty, np.zeros(0, dtype=np.intp)) if return_counts else empty
        if len(tasks) > 1 and self.pool is not None:
            try:
                results = list(self.pool.map(_decompose_block, tasks))
            except BrokenProcessPool as err:
                self.close()
                raise RuntimeError("EEMD worker processes died (a script using processes > 1 needs an "
                                   "`if __name__ == '__main__':` guard, workers are spawned)") from err
        else:
            results = [_decompose_block(task) for task in tasks]
        components = np.concatenate([parts for parts, _ in results])
        if return_counts:
            return components, np.concatenate([counts for _, counts in results])
        return components

    def imf_counts(self, windows: np.ndarray) -> np.ndarray:
        """Number of IMFs of each window (EEMD: the most any trial had), [N] int."""
        return self.decompose(windows, return_counts=True)[1]

    def close(self) -> None:
        """Stops the worker pool (a later `decompose` starts a new one)."""
        if self._finalizer is not None:
            self._finalizer()
        self._pool = self._finalizer = None

    def __enter__(self) -> RollingEEMD:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _checked_windows(windows: np.ndarray) -> np.ndarray:
    windows = np.ascontiguousarray(windows, dtype=np.float64)
    if windows.ndim != 2 or windows.shape[1] < 3:
        raise ValueError(f"windows must be [N, W] with W >= 3, got shape {windows.shape}")
    if not np.isfinite(windows).all():
        raise ValueError("windows contain NaN or infinite values")
    return windows


def trailing_windows(series: np.ndarray, width: int, ends: np.ndarray) -> np.ndarray:
    """[len(ends), width] float64 windows series[e - width + 1 .. e] (both included) for each e in ends."""
    series = np.asarray(series, dtype=np.float64)
    ends = np.asarray(ends)
    if series.ndim != 1:
        raise ValueError(f"series must be 1-D, got shape {series.shape}")
    if width < 1 or ends.ndim != 1 or (len(ends) and not np.issubdtype(ends.dtype, np.integer)):
        raise ValueError(f"need width >= 1 and a 1-D integer array of ends, got width {width}, ends {ends.dtype}"
                         f"{list(ends.shape)}")
    if len(ends) and (ends.min() < width - 1 or ends.max() >= len(series)):
        raise ValueError(f"window ends must lie in [{width - 1}, {len(series) - 1}], got {ends.min()}..{ends.max()}")
    view = np.lib.stride_tricks.sliding_window_view(series, width) if len(series) >= width else np.zeros((0, width))
    return np.ascontiguousarray(view[ends.astype(np.intp) - (width - 1)])
