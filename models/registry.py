"""Method names to classes, and building a method from a name, its options and auxiliary pretext weights."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from streamssl.models.byol import BYOL
from streamssl.models.cpc import CPC
from streamssl.models.deepcluster import DeepCluster
from streamssl.models.forecaster import Forecaster
from streamssl.models.jigsaw import Jigsaw
from streamssl.models.method import Method
from streamssl.models.moco import MoCo
from streamssl.models.multitask import MultiTask
from streamssl.models.npid import NPID
from streamssl.models.rotation import Rotation
from streamssl.models.simclr import SimCLR
from streamssl.models.simsiam import SimSiam
from streamssl.models.swav import SwAV

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (MoCo, SwAV, BYOL, SimCLR, SimSiam, DeepCluster, NPID, Rotation, Jigsaw)
}
# Time-series methods: trained by the series job (pipeline/series/job.py) on windows, not on images.
SERIES_METHODS: dict[str, type] = {"cpc": CPC, "forecast": Forecaster}


def build_method(name: str, backbone: nn.Module, feature_dim: int, options: dict[str, Any],
                 aux: dict[str, float] | None = None) -> Method:
    """Builds method `name` around `backbone`; `options` are its keyword-only hyper-parameters, `aux` maps
    pretext tasks (rotation, jigsaw) to loss weights; non-zero ones become extra heads on the same backbone."""
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; valid: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    # A method's hyper-parameters are exactly its keyword-only constructor arguments.
    valid = [param.name for param in inspect.signature(cls).parameters.values()
             if param.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) for method '{name}': {', '.join(unknown)}; "
                         f"valid: {', '.join(valid)}")
    method = cls(backbone, feature_dim, **options)
    weights = {task: weight for task, weight in (aux or {}).items() if weight}
    if not weights:
        return method
    if name in weights:
        raise ValueError(f"'{name}' cannot also be its own auxiliary task")
    return MultiTask(method, weights)
