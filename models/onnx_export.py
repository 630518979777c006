"""`encoder.onnx` in a published version folder: the encoder for consumers without Python or torch.

The graph is what `load_encoder` returns, normalisation included: an onnxruntime consumer feeds exactly what a
Python one feeds (images: float pixels in [0, 1], [batch, C, H, W]; series: windows [batch, C, T], raw values for
an offline forecaster, whose manifest has input.mean/std, and windows z-scored per series with input.series[ID]
for a streaming one, whose normalisation cannot live in one graph). The batch axis is dynamic, the rest fixed
by the manifest. Exported with torch's dynamo exporter at opset `OPSET`, as one self-contained file, then run
once in onnxruntime next to torch: a graph that does not reproduce the torch encoder is not published.

An encoder the exporter cannot handle (a user backbone with data-dependent control flow, onnxscript missing)
does not stop the publish: the version goes out without the file, its manifest saying `"onnx": null` and why.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from streamssl.models.artifacts import Artifact, with_file
from streamssl.models.encoder_io import Manifest, build_published
from streamssl.models.published import PublishedEncoder, PublishedSeriesEncoder

ONNX_FILE = "encoder.onnx"
OPSET = 18
OUTPUT_NAME = "embeddings"
# onnxruntime may differ from torch by float rounding (fused kernels, another summation order), no more
TOLERANCE = 1e-4
_EXAMPLE_BATCH = 2  # an example batch of 1 would make the exporter specialise the batch axis to 1

log = logging.getLogger(__name__)


def onnx_input(manifest: Manifest) -> tuple[str, list[int], str]:
    """(input name, shape without the batch axis, what the values are) of the manifest's encoder."""
    spec, name = manifest.input, manifest.backbone
    if "height" in spec and "width" in spec:
        return "images", [spec["channels"], spec["height"], spec["width"]], (
            "float pixels in [0, 1], normalised inside with input.mean/std")
    if name.startswith("forecaster-") or name == "series-conv":
        length = spec["lag"] if name.startswith("forecaster-") else spec["window"]
        if "mean" in spec:
            return "windows", [spec["channels"], length], "raw values, z-scored inside with input.mean/std"
        return "windows", [spec["channels"], length], "values z-scored per series with input.series[ID].mean/std first"
    raise ValueError(f"no input shape known for backbone {name!r}: its manifest's input names no height/width, "
                     "lag or window")


def export_onnx(folder: Path, backbone: nn.Module, manifest: Manifest) -> Manifest:
    """An `Artifact`: writes `encoder.onnx` into `folder` and describes it in the manifest's `onnx`; on an
    export failure, no file, `onnx` None and the reason in `onnx_unavailable` (logged as a warning)."""
    path = folder / ONNX_FILE
    try:
        description = _export(path, backbone, manifest)
    except OSError:
        raise  # a full or read-only disk fails the whole publish, as it would for the weights
    except Exception as error:  # the exporter raises many kinds of error, and none may stop the run
        path.unlink(missing_ok=True)
        first_line = (str(error).strip().splitlines() or [""])[0]
        reason = f"export failed: {type(error).__name__}: {first_line[:300]}"
        log.warning("version published without %s (%s)", ONNX_FILE, reason)
        return replace(manifest, onnx=None, onnx_unavailable=reason)
    return with_file(replace(manifest, onnx=description, onnx_unavailable=""), folder, ONNX_FILE)


def onnx_skipped(reason: str) -> Artifact:
    """An `Artifact` that exports nothing and says why in the manifest (e.g. publish.onnx is off)."""

    def skipped(folder: Path, backbone: nn.Module, manifest: Manifest) -> Manifest:
        return replace(manifest, onnx=None, onnx_unavailable=reason)

    return skipped


def _export(path: Path, backbone: nn.Module, manifest: Manifest) -> dict[str, Any]:
    input_name, shape, values = onnx_input(manifest)
    module = _published_copy(backbone, manifest, image=input_name == "images")
    example = torch.rand(_EXAMPLE_BATCH, *shape, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    with _exporter_quiet():
        torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=OPSET, external_data=False,
                          input_names=[input_name], output_names=[OUTPUT_NAME], verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    seconds = time.perf_counter() - started
    # another batch size than the example's: the batch axis must really be dynamic
    difference, scale = _compare(path, module, torch.rand(_EXAMPLE_BATCH + 1, *shape,
                                                          generator=torch.Generator().manual_seed(1)))
    if not difference <= TOLERANCE * max(1.0, scale):  # `not <=`: a NaN difference fails too
        raise ValueError(f"onnxruntime's output differs from torch's by {difference:.3g}")
    return {"file": ONNX_FILE, "opset": OPSET, "exporter": f"torch.onnx (dynamo) {torch.__version__}",
            "input": {"name": input_name, "shape": ["batch", *shape], "dtype": "float32", "values": values},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", manifest.embedding_dim], "dtype": "float32"},
            "max_abs_diff": difference, "export_seconds": round(seconds, 2)}


def _published_copy(backbone: nn.Module, manifest: Manifest, *, image: bool) -> nn.Module:
    """What `load_encoder` returns for these weights, on the CPU in eval mode; the live backbone (training, maybe
    on a GPU, with the training's hooks on it) is left alone."""
    try:
        fresh, wrapper = build_published(manifest, [manifest.backbone])  # the trainer already imported its own factory
    except (ValueError, KeyError):  # a backbone `load_encoder` cannot build (a user's own): a copy of it
        copied = copy.deepcopy(backbone).cpu()
        return (PublishedEncoder if image else PublishedSeriesEncoder)(copied, manifest.to_dict()).eval()
    fresh.load_state_dict({name: value.detach().cpu() for name, value in backbone.state_dict().items()})
    return wrapper(fresh, manifest.to_dict()).eval()


def _compare(path: Path, module: nn.Module, inputs: torch.Tensor) -> tuple[float, float]:
    """(largest |onnxruntime − torch|, largest |torch|) over `module`'s outputs for `inputs`; `path` is its export."""
    import onnxruntime  # imported here: only publishing with ONNX needs it

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    with torch.no_grad():
        expected = module(inputs)
    return float((torch.from_numpy(got) - expected).abs().max()), float(expected.abs().max())


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """The exporter logs each optimiser pass (INFO) and, when it cannot capture a model, every strategy it tried
    (WARNING) and prints the graph so far to stderr: dozens of lines, where the run's log gets a one-line outcome.
    (stderr is swapped only while the loop waits for the publish; its log handlers keep their own stream.)"""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export",
                                                    "torch._export", "torch._dynamo", "torch.fx.experimental")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.ERROR))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
