"""The model card: `README.md` in a published version folder, what a person deciding whether to use it reads.

Written from the manifest alone (after the weights and the ONNX export, before the manifest is hashed, so its
sha256 is in `files`): what trained it on which stream range, its metrics and how they were measured, what it is
for and where it is untested, how to load it with `streamssl.models.load_encoder` and with onnxruntime (both
snippets run as written from the folder's parent directory), and the sha256 of the files beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from streamssl.models.artifacts import with_file
from streamssl.models.encoder_io import Manifest
from streamssl.models.onnx_export import OUTPUT_NAME, onnx_input

CARD_FILE = "README.md"
_DEMO_LAKE = "the embedded Fashion-MNIST demo lake (60,000 training images as PNG shards)"


def write_model_card(folder: Path, backbone: nn.Module, manifest: Manifest) -> Manifest:
    """An `Artifact`: the card for `manifest`, in `folder`."""
    (folder / CARD_FILE).write_text(model_card(manifest), encoding="utf-8")
    return with_file(manifest, folder, CARD_FILE)


def model_card(manifest: Manifest) -> str:
    name = f"v{manifest.version:06d}"
    lineage = manifest.lineage
    config = lineage.get("config", {})
    image = "height" in manifest.input
    options = ", ".join(f"{key}={value}" for key, value in sorted(manifest.backbone_options.items()))
    lines = [
        f"# {manifest.method or 'streamssl'} encoder {name}",
        "",
        f"Published {manifest.created_at or '(no time recorded)'} by streamssl"
        f"{' ' + lineage['streamssl_version'] if 'streamssl_version' in lineage else ''}"
        f"{' from run dir `' + lineage['run_dir'] + '`' if 'run_dir' in lineage else ''}. Everything here is also "
        "in `manifest.json`, which `load_encoder` checks before it loads anything.",
        "",
        "## Training",
        "",
        f"- Method: `{manifest.method}`{_method_options(config, manifest.method)}, self-supervised: no labels.",
        f"- Backbone: `{manifest.backbone}`{f' ({options})' if options else ''}, embeddings `[batch, "
        f"{manifest.embedding_dim}]`.",
        f"- Data: {_source(manifest, config)}.",
        f"- Trained for {manifest.step} steps on {manifest.samples_seen} samples"
        f"{' per worker, ' + str(lineage['workers']) + ' workers' if lineage.get('workers', 1) > 1 else ''}.",
        *_stream_range(lineage),
        *_code(lineage),
        "",
        "## Metrics",
        "",
        *_metrics(manifest, config),
        "",
        "## Intended use and limits",
        "",
        *_intended_use(manifest, config, image),
        "",
        "## Load it in Python",
        "",
        "With `pip install streamssl` (torch and safetensors; no training code runs), from the folder holding "
        f"`{name}`:",
        "",
        "```python",
        *python_snippet(manifest),
        "```",
        "",
        "## Load it with onnxruntime",
        "",
        *_onnx_section(manifest),
        "",
        "## Files",
        "",
        "| file | sha256 |",
        "|---|---|",
        *[f"| `{file}` | `{digest}` |" for file, digest in sorted(manifest.files.items())],
        "",
        f"This card's own sha256 is in `manifest.json` (`files.{CARD_FILE}`), with the others.",
        "",
    ]
    return "\n".join(lines)


def python_snippet(manifest: Manifest) -> list[str]:
    """Loads the encoder from its folder and embeds an example batch of the input it takes."""
    lines = ["import torch", "from streamssl.models import load_encoder", "",
             f'folder = "v{manifest.version:06d}"  # this version\'s folder',
             "encoder = load_encoder(folder)  # checks the manifest and every file's sha256 first"]
    example = _example(manifest)
    if example is None:
        return [*lines, "# the input it takes: see manifest.json's input"]
    input_name, shape, values = example
    return [*lines, f"{input_name} = torch.rand(8, {', '.join(map(str, shape))})  # {values}",
            "with torch.no_grad():", f"    {OUTPUT_NAME} = encoder({input_name})  # [8, {manifest.embedding_dim}]"]


def onnx_snippet(manifest: Manifest) -> list[str]:
    """Runs the ONNX export on an example batch, with numpy and onnxruntime only."""
    assert manifest.onnx is not None
    spec = manifest.onnx["input"]
    shape = ", ".join(map(str, spec["shape"][1:]))
    return ["import numpy as np", "import onnxruntime", "",
            f'folder = "v{manifest.version:06d}"  # this version\'s folder',
            f'session = onnxruntime.InferenceSession(f"{{folder}}/{manifest.onnx["file"]}", '
            'providers=["CPUExecutionProvider"])',
            f"{spec['name']} = np.random.rand(8, {shape}).astype(np.{spec['dtype']})  # {spec['values']}",
            f'({OUTPUT_NAME},) = session.run(["{manifest.onnx["output"]["name"]}"], {{"{spec["name"]}": {spec["name"]}}})'
            f"  # [8, {manifest.embedding_dim}]"]


def _onnx_section(manifest: Manifest) -> list[str]:
    if manifest.onnx is None:
        return [f"No ONNX export in this version ({manifest.onnx_unavailable or 'none recorded'})."]
    spec, output = manifest.onnx["input"], manifest.onnx["output"]
    return [f"`{manifest.onnx['file']}`: opset {manifest.onnx['opset']}, one input `{spec['name']}` "
            f"({spec['dtype']}, shape `{spec['shape']}`, the batch axis dynamic: {spec['values']}) and one output "
            f"`{output['name']}` ({output['dtype']}, `{output['shape']}`). Checked against the torch encoder at "
            f"publish time: max abs difference {manifest.onnx['max_abs_diff']:.2g}.",
            "", "```python", *onnx_snippet(manifest), "```"]


def _example(manifest: Manifest) -> tuple[str, list[int], str] | None:
    try:
        return onnx_input(manifest)
    except (ValueError, KeyError):  # a backbone with an input spec of its own: described in the manifest only
        return None


def _method_options(config: dict[str, Any], method: str) -> str:
    options = config.get(method, {})
    return f" ({', '.join(f'{key}={value}' for key, value in sorted(options.items()))})" if options else ""


def _source(manifest: Manifest, config: dict[str, Any]) -> str:
    if "series" in manifest.extra:  # `streamssl forecast`: one series in memory
        return f"the series `{manifest.extra['series']}`"
    source = config.get("data", {}).get("source", "")
    if not source:
        return _DEMO_LAKE if "height" in manifest.input else "(no source recorded)"
    return f"`{source}`{' (' + config['data']['mode'] + ' mode)' if config['data'].get('mode') else ''}"


def _stream_range(lineage: dict[str, Any]) -> list[str]:
    if "first_position" not in lineage:
        return ["- Stream range: not recorded."]
    return ["- Stream range (each position is the stream right after a record; for a shard lake: the pass, the "
            "shard and the samples taken from it): from",
            f"  `{json.dumps(lineage['first_position'], sort_keys=True)}`",
            f"  to `{json.dumps(lineage['last_position'], sort_keys=True)}`."]


def _code(lineage: dict[str, Any]) -> list[str]:
    if "config_digest" not in lineage:
        return []
    versions = ", ".join(f"{key.removesuffix('_version')} {lineage[key]}" for key in
                         ("streamssl_version", "torch_version", "python_version") if key in lineage)
    commit = (f"; git commit `{lineage['git_sha']}`{' with uncommitted changes' if lineage.get('git_dirty') else ''}"
              if "git_sha" in lineage else "")
    return [f"- Config: sha256 `{lineage['config_digest']}` of `lineage.config` in manifest.json (canonical JSON).",
            f"- Code: {versions}{commit}."]


def _metrics(manifest: Manifest, config: dict[str, Any]) -> list[str]:
    metrics = manifest.metrics
    if not metrics:
        return ["None measured (the run's monitor was off)."]
    lines = [f"- `{key}`: {value:.4g}" if isinstance(value, float) else f"- `{key}`: {value}"
             for key, value in sorted(metrics.items()) if key != "nrmse_definition"]
    evaluation = config.get("eval", {})
    if "knn_top1" in metrics:
        labelled = evaluation.get("data") or evaluation.get("dataset", "fashion-mnist")
        lines += ["", f"Protocol: weighted kNN top-1 (cosine similarity, k={evaluation.get('k', '?')}, "
                  f"T={evaluation.get('temperature', '?')}) of these weights on `{labelled}`: a bank of "
                  f"{evaluation.get('bank_size', '?')} labelled training images and {evaluation.get('test_size', '?')} "
                  "test images (a fixed subset); `knn_raw_pixels` and `knn_untrained` are the same protocol on raw "
                  "pixels and on this run's encoder before training."]
    if "rolling_nrmse" in metrics:
        lines += ["", f"Protocol: prequential (each point forecast before it is learned) nRMSE over the last "
                  f"{config.get('series', {}).get('eval_points', '?')} points, next to persistence (the last value)."]
    if "nrmse_definition" in metrics:
        lines += ["", f"nRMSE: {metrics['nrmse_definition']}."]
    return lines


def _intended_use(manifest: Manifest, config: dict[str, Any], image: bool) -> list[str]:
    spec = manifest.input
    if image:
        what = (f"An image feature extractor: embeddings for retrieval, clustering or a linear probe, on images like "
                f"its training data ({spec['channels']} channel(s), {spec['height']}×{spec['width']}, pixels in [0, 1]).")
    else:
        what = ("A feature extractor for windows of time series like its training data, normalised as "
                "manifest.json's `input` says.")
    evaluated = "evaluated only as the metrics above say" if manifest.metrics else "not evaluated at all"
    return [what, "",
            f"- Trained on {_source(manifest, config)}, unlabeled; {evaluated}.",
            "- Not evaluated on any other data or task: measure it on yours before relying on it; an embedding "
            "is not calibrated, and nothing here says how it treats inputs unlike its training data.",
            "- A later version of the same run may replace it (`latest`); pin the version folder to stay put."]
