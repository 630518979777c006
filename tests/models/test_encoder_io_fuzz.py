"""Random manifests: a few hundred seeded mutations of real published manifests (fields deleted, added,
retyped, nudged to extremes, bytes of the JSON cut or flipped) either load into a working encoder or raise
EncoderLoadError, never anything else."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from streamssl.models import EncoderLoadError, build_backbone, load_encoder
from streamssl.models.encoder_io import Manifest
from streamssl.models.forecaster import build_trunk
from streamssl.pipeline.publishing import Publisher

VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2, 16, 256, 2**31, 2**63, 10**30, 1e308, float("inf"), float("-inf"), float("nan"),
    0.5, -0.0, "", "convnet", "resnet18", "series-conv", "forecaster-cnn", "forecaster-lstm", "../../secret",
    "/etc/hostname", "a\nb", "0" * 64, "F" * 64, [], [1.0], [0.5, 0.5], [[1]], {}, {"a": 1},
    {"encoder.safetensors": "0" * 64}, {"channels": 1}, {"mean": 1.0, "std": 0.0},
]
NAMES = ["backbone", "input", "embedding_dim", "feature_dim", "eval", "metrics", "files", "channels", "lag",
         "mean", "std", "series", "channel_names", "height", "encoder.safetensors", "../x", "extra"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is many times faster on busy cores


SERIES = Manifest(backbone="forecaster-cnn", embedding_dim=16, method="forecast", step=40,
                  input={"channels": 2, "channel_names": ["series", "imf-1"], "lag": 6, "window": 32, "horizon": 1,
                         "mean": [5.0, 0.1], "std": [2.0, 0.5],
                         "series": {"a": {"mean": 1.0, "std": 2.0}}})
IMAGE = Manifest(backbone="convnet", embedding_dim=256, method="moco", step=10,
                 input={"channels": 1, "height": 28, "width": 28, "mean": [0.286], "std": [0.353]})


def _slots(node: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in a JSON tree."""
    keys = node.keys() if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []
    return [slot for key in list(keys) for slot in [(node, key), *_slots(node[key])]]


def _nudge(value: Any, rng: random.Random) -> Any:
    """A value of the same kind, pushed somewhere awkward."""
    if isinstance(value, bool) or value is None:
        return rng.choice(VALUES)
    if isinstance(value, int | float):
        return value * rng.choice([-1, 0, 2, 10**6, 10**20]) + rng.choice([0, 1, -1])
    if isinstance(value, str):
        return rng.choice([value + "x", value.upper(), "../" + value, value[:-1], value * 3])
    if isinstance(value, list):
        return rng.choice([value + value, value[:-1], list(reversed(value)), [value]])
    return rng.choice([{}, {**value, rng.choice(NAMES): rng.choice(VALUES)}, list(value)])


def _mutate(manifest: dict[str, Any], rng: random.Random) -> bytes:
    if rng.random() < 0.15:  # the text itself: a slice cut out, or a byte flipped
        text = bytearray(json.dumps(manifest).encode())
        at = rng.randrange(len(text))
        if rng.random() < 0.5:
            del text[at:at + rng.randint(1, 20)]
        else:
            text[at] ^= 1 << rng.randrange(8)
        return bytes(text)
    data: Any = copy.deepcopy(manifest)
    for _ in range(rng.randint(1, 3)):
        slots = _slots(data)
        if not slots or rng.random() < 0.03:
            data = rng.choice(VALUES)
            continue
        parent, key = rng.choice(slots)
        action = rng.randrange(4)
        if action == 0 and isinstance(parent, dict):
            del parent[key]
        elif action == 1 and isinstance(parent, dict):
            parent[rng.choice(NAMES)] = rng.choice(VALUES)
        elif action == 2:
            parent[key] = _nudge(parent[key], rng)
        else:
            parent[key] = rng.choice(VALUES)
    return json.dumps(data).encode()


@pytest.mark.parametrize(("kind", "cases"), [("series", 300), ("image", 60)])
def test_a_randomly_mutated_manifest_loads_or_is_an_encoder_load_error(tmp_path: Path, kind: str, cases: int) -> None:
    torch.manual_seed(0)
    backbone = build_trunk("cnn", 2, 6, 16) if kind == "series" else build_backbone("convnet", 1)[0]
    _, folder = Publisher(tmp_path / "published").publish(backbone.eval(), SERIES if kind == "series" else IMAGE)
    original = json.loads((folder / "manifest.json").read_text())
    rng = random.Random(14)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(cases):
        (folder / "manifest.json").write_bytes(_mutate(original, rng))
        try:
            encoder = load_encoder(folder)
        except EncoderLoadError as error:
            assert "\n" not in str(error)
            outcomes["refused"] += 1
            continue
        spec = encoder.manifest["input"]
        shape = (2, spec["channels"], spec["lag"]) if kind == "series" else (2, spec["channels"], 28, 28)
        with torch.no_grad():
            assert encoder(torch.zeros(shape)).shape == (2, encoder.manifest["embedding_dim"])
        outcomes["loaded"] += 1
    # both outcomes happen: the mutations are neither all harmless nor all fatal
    assert outcomes["loaded"] > cases // 20 and outcomes["refused"] > cases // 2, outcomes
