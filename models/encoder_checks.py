"""What a published encoder folder must look like before `load_encoder` trusts any of it.

A folder may come from anyone who can write to it, so every check here assumes the worst: manifest.json is
checked field by field (types, ranges, finite numbers) before any of it is used, file names must stay inside
the folder, and the safetensors header is compared with the state the named backbone expects before a single
tensor is read. Each check raises ValueError with one readable line; `encoder_io` adds the path.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import torch
from torch import Tensor

from streamssl.models.backbones import BACKBONES, is_image_backbone
from streamssl.models.forecaster import TRUNKS

# Bounds far above anything the pipeline publishes (resnet18 is ~45 MB, a series run's manifest lists every
# series' statistics), low enough that a crafted number cannot make the loader allocate absurd amounts.
MAX_MANIFEST_BYTES = 64 << 20
MAX_WEIGHTS_BYTES = 2 << 30
MAX_HEADER_BYTES = 16 << 20
MAX_CHANNELS = 4096
MAX_EMBEDDING_DIM = 65536
MAX_LENGTH = 1_000_000  # a window, lag, horizon, image side or warm-up, in points or pixels
MAX_FILES = 16
MAX_COUNT = 2**63 - 1  # step, samples_seen, version: what an int64 holds

IMAGE_BACKBONES = frozenset(BACKBONES)
SERIES_BACKBONES = frozenset({"series-conv"} | {f"forecaster-{trunk}" for trunk in TRUNKS})
KNOWN_BACKBONES = IMAGE_BACKBONES | SERIES_BACKBONES

_SHA256 = re.compile(r"[0-9a-f]{64}")
# torch dtype -> its safetensors name, for the dtypes a backbone's state can hold
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
# Names manifests were written with before every publisher filled one Manifest; still read.
OLD_NAMES = {"feature_dim": "embedding_dim", "eval": "metrics"}

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80
show = _short.repr  # an untrusted value in a message: bounded, one line, quoted


def parse_manifest_json(raw: bytes) -> Any:
    """The JSON in manifest.json; ValueError for malformed JSON, a key given twice, or nesting too deep."""
    try:
        return json.loads(raw, object_pairs_hook=_refuse_duplicate_keys)
    except RecursionError:
        raise ValueError("nested too deeply to be a manifest") from None
    except ValueError as error:
        raise ValueError(f"not valid JSON ({str(error)[:120]})") from None


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers may keep different copies of a repeated key; a manifest means one thing to every reader.
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the key {show(key)} appears twice")
        seen.add(key)
    return dict(pairs)


def check_manifest(data: Any) -> None:
    """ValueError naming the first field of a manifest.json's contents that `load_encoder` cannot use."""
    if not isinstance(data, dict):
        raise ValueError(f"must be a JSON object, got {show(data)}")
    for old, new in OLD_NAMES.items():
        if old in data and new in data:
            raise ValueError(f"has both {new} and its old name {old}")
    data = {OLD_NAMES.get(name, name): value for name, value in data.items()}
    for name in ("backbone", "input", "embedding_dim"):
        if name not in data:
            raise ValueError(f"{name} is missing")
    backbone = data["backbone"]
    if not isinstance(backbone, str) or (backbone not in KNOWN_BACKBONES and not is_image_backbone(backbone)):
        raise ValueError(f"unknown backbone {show(backbone)} (known: {', '.join(sorted(KNOWN_BACKBONES))}, "
                         "torchvision:NAME, package.module:factory)")
    _integer(data, "embedding_dim", 1, MAX_EMBEDDING_DIM)
    for name in ("step", "samples_seen", "version"):
        _integer(data, name, 0, MAX_COUNT, required=False)
    for name in ("method", "created_at"):
        if not isinstance(data.get(name, ""), str):
            raise ValueError(f"{name} must be a string, got {show(data[name])}")
    for name in ("metrics", "backbone_options", "files", "lineage"):
        _object(data, name, required=False)
    if data.get("onnx") is not None:
        _object(data, "onnx")
    _check_input(_object(data, "input"), backbone)
    _check_files(data.get("files", {}))


def _check_input(spec: dict[str, Any], backbone: str) -> None:
    channels = _integer(spec, "channels", 1, MAX_CHANNELS, where="input.")
    for name in ("height", "width", "window", "horizon", "warmup_points"):
        _integer(spec, name, 1, MAX_LENGTH, required=False, where="input.")
    if backbone.startswith("forecaster-"):
        _integer(spec, "lag", 1, MAX_LENGTH, where="input.")
    # Image encoders normalise inside and need both; a series trunk falls back to 0 / 1 per channel.
    for name in ("mean", "std"):
        if name in spec or is_image_backbone(backbone):
            _statistics(spec, name, channels)
    names = spec.get("channel_names", [])
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names) or (
            names and len(names) != channels):
        raise ValueError(f"input.channel_names must be {channels} strings, got {show(names)}")
    series = _object(spec, "series", required=False, where="input.")
    for series_id, stats in series.items():
        if not isinstance(stats, dict):
            raise ValueError(f"input.series[{show(series_id)}] must be an object, got {show(stats)}")
        for name in ("mean", "std"):
            _number(stats.get(name), f"input.series[{show(series_id)}].{name}", positive=name == "std")


def _check_files(files: dict[str, Any]) -> None:
    if len(files) > MAX_FILES:
        raise ValueError(f"files lists {len(files)} files, more than {MAX_FILES}")
    for name, digest in files.items():
        check_file_name(name)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ValueError(f"files[{show(name)}] must be a sha256 (64 lowercase hex digits), got {show(digest)}")


def check_file_name(name: str) -> None:
    """A name in `files` must be a plain relative path inside the folder: not absolute, no `..`, canonical."""
    path = PurePosixPath(name)
    if path.is_absolute():
        problem = "an absolute path"
    elif ".." in path.parts:
        problem = "a path out of the folder (..)"
    elif not name or str(path) != name or "\\" in name or any(ord(char) < 32 for char in name):
        problem = "not a plain relative name"
    else:
        return
    raise ValueError(f"files lists {show(name)}: {problem}; only files inside the encoder folder are read")


def expected_layout(state: Mapping[str, Tensor]) -> tuple[dict[str, tuple[str, list[int]]], int]:
    """({name: (safetensors dtype, shape)}, bytes of tensor data) of a backbone's state (a meta one will do)."""
    layout = {name: (SAFETENSORS_DTYPES.get(value.dtype, str(value.dtype)), list(value.shape))
              for name, value in state.items()}
    return layout, sum(value.numel() * value.element_size() for value in state.values())


def check_weights_header(weights: bytes, layout: Mapping[str, tuple[str, list[int]]], data_bytes: int) -> None:
    """ValueError unless a safetensors file holds exactly `layout`'s tensors, dtypes and shapes, and no more."""
    header_size = int.from_bytes(weights[:8], "little")
    if len(weights) < 8 or header_size > min(MAX_HEADER_BYTES, len(weights) - 8):
        raise ValueError("is not a safetensors file (its header size does not fit the file)")
    try:
        header = json.loads(weights[8:8 + header_size])
    except (ValueError, RecursionError):
        raise ValueError("is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ValueError("is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    wrong_shape, wrong_dtype = [], []
    for name in sorted(layout.keys() & header.keys()):
        entry, (dtype, shape) = header[name], layout[name]
        got = entry if not isinstance(entry, dict) else entry.get("shape")
        if got != shape:
            wrong_shape.append(f"{show(name)} {show(got)} for {shape}")
        elif entry.get("dtype") != dtype:
            wrong_dtype.append(f"{show(name)} {show(entry.get('dtype'))} for {dtype}")
    problems = [f"{what} {_first_few(items)}" for what, items in (
        ("missing", [show(name) for name in sorted(layout.keys() - header.keys())]),
        ("unexpected", [show(name) for name in sorted(header.keys() - layout.keys())]),
        ("wrong shape", wrong_shape), ("wrong dtype", wrong_dtype)) if items]
    if problems:
        raise ValueError(f"does not fit the backbone ({'; '.join(problems)})")
    if len(weights) - 8 - header_size != data_bytes:
        raise ValueError(f"holds {len(weights) - 8 - header_size} bytes of tensor data; the backbone's "
                         f"{len(layout)} tensors take {data_bytes}")


def _first_few(items: list[str]) -> str:
    return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def _integer(data: dict[str, Any], name: str, low: int, high: int, *, required: bool = True,
             where: str = "") -> int:
    value = data.get(name, low if not required else None)
    # bool is an int to Python, but `true` for a size is a mistake, not 1
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{where}{name} must be an integer in {low}..{high}, got {show(value)}")
    return value


def _object(data: dict[str, Any], name: str, *, required: bool = True, where: str = "") -> dict[str, Any]:
    value = data.get(name, None if required else {})
    if not isinstance(value, dict):
        raise ValueError(f"{where}{name} must be a JSON object, got {show(value)}")
    return value


def _number(value: Any, name: str, *, positive: bool) -> None:
    if (not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value)
            or (positive and value <= 0)):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got {show(value)}")


def _statistics(spec: dict[str, Any], name: str, channels: int) -> None:
    values = spec.get(name)
    if not isinstance(values, list) or len(values) != channels:
        raise ValueError(f"input.{name} must be a list of {channels} numbers (one per channel), got {show(values)}")
    for index, value in enumerate(values):
        _number(value, f"input.{name}[{index}]", positive=name == "std")
