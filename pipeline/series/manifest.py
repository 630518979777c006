"""What a published series encoder's manifest says: the window, each series' normalisation, the views."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from streamssl.models.encoder_io import Manifest
from streamssl.pipeline.series.examples import NRMSE_DEFINITION

if TYPE_CHECKING:
    from streamssl.pipeline.series.job import SeriesTask


def series_manifest(task: SeriesTask) -> Manifest:
    """What a consumer needs to feed the encoder: the window, each series' normalisation, the views; the
    latest training logs join the eval metrics."""
    s = task.cfg.series
    inputs: dict[str, Any] = {
        "channels": 1, "window": s.window, "warmup_points": s.warmup_points,
        "normalisation": "z-score per series with the mean/std of its first warmup_points points",
        "series": {sid: {"mean": mean, "std": std} for sid, (mean, std) in sorted(task.norm.items())}}
    if not task.forecasting:
        conv = task.model.backbone  # build_series_encoder's options
        options = {"channels": conv.channels, "hidden": conv.hidden, "layers": conv.layers, "downsample": conv.downsample}
        return Manifest(backbone="series-conv", input=inputs, embedding_dim=task.model.feature_dim,
                        backbone_options=options, metrics=dict(task.last_logs))
    names = task.spec.component_names()
    channels = ["series"] + ([names[k] for k in task.decided_groups.views] if task.uses_views else [])
    inputs.update(channels=len(channels), channel_names=channels, lag=s.lag, horizon=s.horizon)
    return Manifest(backbone=f"forecaster-{task.options.get('trunk', 'cnn')}", input=inputs,
                    embedding_dim=task.options.get("hidden", 64), metrics=dict(task.last_logs),
                    backbone_options={"in_channels": len(channels), "lag": s.lag, "hidden": task.options.get("hidden", 64)},
                    extra={"mode": task.mode, "nrmse_definition": NRMSE_DEFINITION,
                           "groups": None if task.groups is None else task.groups.as_dict(),
                           "decomposition": dataclasses.asdict(task.spec) if task.eemd is not None else None})
