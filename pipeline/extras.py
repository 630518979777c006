"""Optional dependencies: the pip extra each one comes with, and one readable line when it is missing.

The base install (`pip install streamssl`) trains on local lakes; Kafka, Ray, time series, ONNX export and
reports each need an extra (pyproject.toml). Every import site of such a package goes through `require`, so a
run that needs one that is not installed stops with `streamssl: error: kafka:// needs 'pip install
streamssl[kafka]'` (exit 2) instead of a ModuleNotFoundError traceback, at the point the feature is chosen.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

from streamssl.pipeline.config import ConfigError


def require(module: str, extra: str, what: str) -> ModuleType:
    """Imports `module` and returns it; ConfigError naming `extra` if it (or a package it needs) is not installed.

    Args:
        module: the import name, e.g. "kafka" or "ray.train".
        extra: the pyproject extra that installs it, e.g. "kafka".
        what: the feature that needs it, as the user chose it, e.g. "kafka://" or "--workers".
    """
    try:
        with warnings.catch_warnings():  # kafka-python warns at import; that is not the user's business
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(module)
    except ModuleNotFoundError as err:
        # A dependency of the package missing (a half-finished install) is named: reinstalling the extra fixes both.
        missing = "" if err.name is None or err.name == module.split(".")[0] else f" (no module named {err.name})"
        raise ConfigError(f"{what} needs 'pip install streamssl[{extra}]'{missing}") from None
