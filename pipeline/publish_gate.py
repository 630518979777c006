"""The publish gate: whether a new encoder may become `latest` (pipeline/release.py asks before every publish).

Two checks, both on measurements of exactly the weights about to go out:
* collapse: the mean per-dimension std of its L2-normalised embeddings of real inputs (the task's
  `probe_inputs()`: the kNN monitor's test images, else the last training batch) is about 1/sqrt(d) for a
  healthy encoder and 0 for one whose outputs all coincide; below `publish.min_std_ratio` / sqrt(d), or not
  finite, it is refused as collapsed. A task without probe inputs skips this check.
* regression: its eval metric (the first of `JUDGED` the metrics hold) against the best value published so far,
  with `publish.tolerance` of slack in the metric's direction. A series run's rolling nRMSE is over the stream's
  most recent points, which differ from one eval to the next (a harder stretch raises every model's error), so
  it is judged as its ratio to the persistence forecast's nRMSE on the same points. The best so far is what
  the published manifests say: each records the best up to and including itself under `gate.best`, so it
  outlives retention and restarts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.pipeline.sections import PublishConfig

# Metric name -> +1 where higher is better, -1 where lower is; the first one present in an eval is judged.
JUDGED = {"knn_top1": 1, "rolling_nrmse_ratio": -1, "nrmse": -1}
PROBE_ROWS = 256  # inputs embedded for the collapse check: a stable std (64 give the same to 2 digits), ~2% of a kNN eval


@dataclass
class Verdict:
    """What the gate decided: `refused` is "" (publish), "collapsed" or "regressed"; `why` is the one-line reason;
    `record` goes into the manifest under "gate" (the measurements, and the best metric so far)."""

    refused: str = ""
    why: str = ""
    record: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def std_ratio(encoder: nn.Module, inputs: Tensor) -> float:
    """sqrt(d) times the mean per-dimension std of the encoder's L2-normalised embeddings of `inputs` (eval mode):
    about 1 when they spread over the sphere, 0 when they all coincide; NaN for non-finite outputs."""
    was_training = encoder.training
    encoder.eval()
    try:
        parameter = next(encoder.parameters(), None)
        device = parameter.device if parameter is not None else inputs.device
        embeddings = encoder(inputs[:PROBE_ROWS].to(device)).float().flatten(1)
    finally:
        encoder.train(was_training)
    if not torch.isfinite(embeddings).all():
        return float("nan")
    return float(F.normalize(embeddings, dim=1).std(dim=0).mean()) * math.sqrt(embeddings.shape[1])


def judged_metric(metrics: dict[str, Any]) -> tuple[str, float]:
    """The name and value of the metric the gate compares (("", nan) when the eval has none of `JUDGED`)."""
    if isinstance(metrics.get("rolling_nrmse"), int | float) and metrics.get("rolling_nrmse_persistence"):
        metrics = {**metrics, "rolling_nrmse_ratio": metrics["rolling_nrmse"] / metrics["rolling_nrmse_persistence"]}
    name = next((name for name in JUDGED if isinstance(metrics.get(name), int | float)), "")
    return name, float(metrics[name]) if name else float("nan")


def best_published(directory: Path, name: str) -> float | None:
    """The best `name` any published manifest in `directory` holds or records as the best before it."""
    values: list[float] = []
    for manifest in Path(directory).glob("v[0-9]*/manifest.json"):
        try:
            data = json.loads(manifest.read_text())
            candidates = (data.get("metrics", {}).get(name), data.get("gate", {}).get("best", {}).get(name))
        except (OSError, ValueError, AttributeError):
            continue  # a folder being pruned, or not ours: it cannot vouch for a best value
        values += [float(value) for value in candidates if isinstance(value, int | float) and math.isfinite(value)]
    if not values:
        return None
    return max(values) if JUDGED[name] > 0 else min(values)


def judge(cfg: PublishConfig, directory: Path, encoder: nn.Module, probe: Tensor | None,
          metrics: dict[str, Any]) -> Verdict:
    """Whether `encoder`, with eval `metrics`, may be published into `directory` (always, with `publish.gate` off)."""
    if not cfg.gate:
        return Verdict()
    record: dict[str, Any] = {}
    if probe is not None and len(probe) >= 2:
        ratio = std_ratio(encoder, probe)
        record["embedding_std_ratio"] = ratio if math.isfinite(ratio) else None  # JSON has no NaN
        if not ratio >= cfg.min_std_ratio:  # NaN too
            return Verdict("collapsed", f"embedding std {ratio:.4f}/sqrt(d) over {min(len(probe), PROBE_ROWS)} "
                           f"real inputs is below publish.min_std_ratio {cfg.min_std_ratio}/sqrt(d)", record)
    name, value = judged_metric(metrics)
    if not name:
        return Verdict(record=record)
    best = best_published(directory, name)
    sign = JUDGED[name]
    if not math.isfinite(value):
        return Verdict("regressed", f"{name} is {value}: the eval failed", record)
    if best is not None and sign * (best - value) > cfg.tolerance:
        record["best"] = {name: best}
        return Verdict("regressed", f"{name} {value:.4f} regressed from the best published {best:.4f} by more than "
                       f"publish.tolerance {cfg.tolerance} ({'higher' if sign > 0 else 'lower'} is better)", record)
    better = best is None or sign * (value - best) > 0
    record["best"] = {name: value if better else best}
    return Verdict(record=record)
