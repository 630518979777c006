"""Crafted encoder folders: each one really published, then tampered with on disk, must be one EncoderLoadError
naming the problem (and one line from `streamssl eval`), never another exception, a read outside the folder,
or an allocation the weights file does not back."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from streamssl.models import EncoderLoadError, build_backbone, load_encoder
from streamssl.models.encoder_io import Manifest
from streamssl.pipeline.cli import main
from streamssl.pipeline.publishing import Publisher

Tamper = Callable[[Path], Path]  # changes a published version folder; returns the path to load

IMAGE_MANIFEST = Manifest(backbone="convnet", embedding_dim=256, method="moco", step=10, samples_seen=640,
                          input={"channels": 1, "height": 28, "width": 28, "mean": [0.286], "std": [0.353]})


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is many times faster on busy cores


def publish(root: Path) -> Path:
    """A real published image encoder: root/published/v000001 (and `latest`); returns the version folder."""
    torch.manual_seed(0)
    return Publisher(root / "published").publish(build_backbone("convnet", 1)[0].eval(), IMAGE_MANIFEST)[1]


def write_manifest(folder: Path, manifest: Any) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def edit(change: Callable[[dict[str, Any]], object]) -> Tamper:
    def tamper(folder: Path) -> Path:
        manifest = json.loads((folder / "manifest.json").read_text())
        change(manifest)
        write_manifest(folder, manifest)
        return folder
    return tamper


def raw(text: bytes) -> Tamper:
    def tamper(folder: Path) -> Path:
        (folder / "manifest.json").write_bytes(text)
        return folder
    return tamper


def rehashed_weights(change: Callable[[bytes], bytes]) -> Tamper:
    """New weights bytes, and the manifest consistently re-hashed to match them (what anyone who can write the
    folder can do)."""
    def tamper(folder: Path) -> Path:
        weights = change((folder / "encoder.safetensors").read_bytes())
        (folder / "encoder.safetensors").write_bytes(weights)
        return edit(lambda m: m["files"].update({"encoder.safetensors": hashlib.sha256(weights).hexdigest()}))(folder)
    return tamper


def secret(folder: Path) -> Path:
    """A file next to published/, outside every version folder, as a system file would be."""
    path = folder.parents[1] / "secret.txt"
    path.write_text("not for encoders\n")
    return path


def list_secret(name: Callable[[Path], str]) -> Tamper:
    """`files` names the secret (by `name`) with its true sha256: only refusing the name keeps it unread."""
    def tamper(folder: Path) -> Path:
        path = secret(folder)
        return edit(lambda m: m["files"].update({name(folder): hashlib.sha256(path.read_bytes()).hexdigest()}))(folder)
    return tamper


def moved_outside(name: str) -> Tamper:
    def tamper(folder: Path) -> Path:
        outside = folder.parents[1] / f"outside-{name}"
        (folder / name).rename(outside)
        (folder / name).symlink_to(outside)
        return folder
    return tamper


def sub_folder_link(folder: Path) -> Path:
    (folder / "sub").symlink_to(secret(folder).parent)
    return list_secret(lambda _: "sub/secret.txt")(folder)


def removed(name: str) -> Tamper:
    def tamper(folder: Path) -> Path:
        (folder / name).unlink()
        return folder
    return tamper


def extra_file(digest: str | None) -> Tamper:
    """A file other than the weights in a sub-folder, listed in `files` (with its true sha256 if `digest` is None)."""
    def tamper(folder: Path) -> Path:
        (folder / "notes").mkdir()
        (folder / "notes" / "readme.txt").write_bytes(b"trained on Fashion-MNIST\n")
        true_digest = hashlib.sha256(b"trained on Fashion-MNIST\n").hexdigest()
        return edit(lambda m: m["files"].update({"notes/readme.txt": digest or true_digest}))(folder)
    return tamper


def fifo_weights(folder: Path) -> Path:
    (folder / "encoder.safetensors").unlink()
    os.mkfifo(folder / "encoder.safetensors")
    return folder


def oversized_manifest(folder: Path) -> Path:
    with open(folder / "manifest.json", "r+b") as handle:  # sparse: no 65 MB written
        handle.truncate(65 << 20)
    return folder


def latest_to(target: Callable[[Path], str]) -> Tamper:
    def tamper(folder: Path) -> Path:
        link = folder.parent / "latest"
        link.unlink()
        link.symlink_to(target(folder))
        return link
    return tamper


def copy_outside(folder: Path) -> str:
    """A complete, valid encoder outside published/ (what a `latest` pointing out of it would load)."""
    elsewhere = folder.parents[1] / "elsewhere"
    elsewhere.mkdir()
    for file in folder.iterdir():
        (elsewhere / file.name).write_bytes(file.read_bytes())
    return str(elsewhere)


def through_sibling_link(folder: Path) -> str:
    (folder.parent / "v000002").symlink_to(copy_outside(folder))
    return "v000002"


def as_float64(weights: bytes) -> bytes:
    return save_safetensors({name: value.double() for name, value in load_safetensors(weights).items()})


def absurd_header_shape(weights: bytes) -> bytes:
    size = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8:8 + size])
    header["block1.conv.weight"]["shape"] = [2**40, 2**40]
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + weights[8 + size:]


def garbage_header(weights: bytes) -> bytes:
    return (16).to_bytes(8, "little") + b"{not json at all" + weights[24:]


CASES: dict[str, tuple[Tamper, str]] = {
    # file names and links: nothing outside the version folder is read
    "files-dotdot": (list_secret(lambda _: "../../secret.txt"), r"'\.\./\.\./secret\.txt': a path out of the folder"),
    "files-absolute": (list_secret(lambda folder: str(folder.parents[1] / "secret.txt")), "an absolute path"),
    "files-control-char": (edit(lambda m: m["files"].update({"a\nb": "0" * 64})), "not a plain relative name"),
    "files-too-many": (edit(lambda m: m["files"].update({f"f{i}": "0" * 64 for i in range(16)})), "more than 16"),
    "weights-link-outside": (moved_outside("encoder.safetensors"), "encoder.safetensors: resolves to .*outside"),
    "manifest-link-outside": (moved_outside("manifest.json"), "manifest.json: resolves to .*outside"),
    "sub-folder-link-outside": (sub_folder_link, "sub/secret.txt: resolves to .*outside"),
    "weights-fifo": (fifo_weights, "encoder.safetensors: not a regular file"),
    "weights-missing": (removed("encoder.safetensors"), "encoder.safetensors: cannot read it"),
    "manifest-oversized": (oversized_manifest, r"manifest.json: 68157440 bytes, more than"),
    # `latest` is followed only inside published/
    "latest-outside": (latest_to(lambda f: os.path.relpath(copy_outside(f), f.parent)), "latest: a link to .*outside"),
    "latest-absolute-outside": (latest_to(copy_outside), "latest: a link to .*outside"),
    "latest-via-sibling-link": (latest_to(through_sibling_link), "latest: a link to .*elsewhere.*outside"),
    "latest-loop": (latest_to(lambda f: "latest"), "latest: cannot resolve"),
    # absurd sizes: refused before anything is allocated
    "absurd-channels": (edit(lambda m: m["input"].update(channels=10**8)), "input.channels must be an integer in 1..4096"),
    "absurd-embedding": (edit(lambda m: m.update(embedding_dim=10**12)), "embedding_dim must be an integer in 1..65536"),
    "absurd-backbone-size": (edit(lambda m: m.update(backbone="forecaster-cnn", embedding_dim=65536, input={
        "channels": 4096, "lag": 10**6})), r"its backbone would take \d+ bytes of weights, more than"),
    "absurd-header-shape": (rehashed_weights(absurd_header_shape),
                            r"wrong shape 'block1.conv.weight' \[1099511627776, 1099511627776\] for \[32, 1, 3, 3\]\)$"),
    "huge-integer": (edit(lambda m: m.update(step=10**30)), "step must be an integer"),
    # wrong JSON types and missing keys
    "not-an-object": (raw(b"[1, 2]"), r"must be a JSON object, got \[1, 2\]"),
    "null": (raw(b"null"), "must be a JSON object, got None"),
    "input-a-list": (edit(lambda m: m.update(input=[1])), r"input must be a JSON object, got \[1\]"),
    "files-a-list": (edit(lambda m: m.update(files=["encoder.safetensors"])), "files must be a JSON object"),
    "metrics-a-string": (edit(lambda m: m.update(metrics="good")), "metrics must be a JSON object"),
    "missing-backbone": (edit(lambda m: m.pop("backbone")), "backbone is missing"),
    "missing-input": (edit(lambda m: m.pop("input")), "input is missing"),
    "missing-weights-hash": (edit(lambda m: m.update(files={})), "files lists no sha256 for encoder.safetensors"),
    "unknown-backbone": (edit(lambda m: m.update(backbone="vit")), "unknown backbone 'vit'"),
    "backbone-a-number": (edit(lambda m: m.update(backbone=7)), "unknown backbone 7"),
    "embedding-mismatch": (edit(lambda m: m.update(embedding_dim=300)), "embedding_dim is 300, but convnet gives 256"),
    "embedding-a-string": (edit(lambda m: m.update(embedding_dim="256")), "embedding_dim must be an integer"),
    "step-a-bool": (edit(lambda m: m.update(step=True)), "step must be an integer"),
    "version-negative": (edit(lambda m: m.update(version=-1)), "version must be an integer in 0.."),
    "method-a-list": (edit(lambda m: m.update(method=["moco"])), "method must be a string"),
    "mean-too-short": (edit(lambda m: m["input"].update(mean=[])), r"input.mean must be a list of 1 numbers"),
    "std-zero": (edit(lambda m: m["input"].update(std=[0])), r"input.std\[0\] must be a finite positive number"),
    "mean-nan": (edit(lambda m: m["input"].update(mean=[float("nan")])), r"input.mean\[0\] must be a finite number"),
    "std-missing": (edit(lambda m: m["input"].pop("std")), "input.std must be a list of 1 numbers"),
    "series-stats-bad": (edit(lambda m: m["input"].update(series={"a": {"mean": "x", "std": 1}})),
                         r"input.series\['a'\].mean must be a finite number"),
    "old-and-new-name": (edit(lambda m: m.update(feature_dim=256)), "has both embedding_dim and its old name"),
    # bad sha256 strings
    "sha256-not-hex": (edit(lambda m: m["files"].update({"encoder.safetensors": "z" * 64})), "must be a sha256"),
    "sha256-uppercase": (edit(lambda m: m["files"].update({"encoder.safetensors": "A" * 64})), "must be a sha256"),
    "sha256-short": (edit(lambda m: m["files"].update({"encoder.safetensors": "abc"})), "must be a sha256"),
    "sha256-a-number": (edit(lambda m: m["files"].update({"encoder.safetensors": 12})), "must be a sha256"),
    "sha256-wrong": (edit(lambda m: m["files"].update({"encoder.safetensors": "0" * 64})), "sha256 mismatch"),
    "extra-file-wrong-hash": (extra_file("0" * 64), r"notes/readme\.txt: sha256 mismatch \(manifest 000000000000"),
    # not JSON at all
    "truncated-json": (raw(b'{"backbone": "convnet", '), "not valid JSON"),
    "binary-garbage": (raw(b"\xff\xfe\x00\x01garbage"), "not valid JSON"),
    "deep-nesting": (raw(b"[" * 200_000 + b"]" * 200_000), "nested too deeply"),
    "duplicate-key": (raw(b'{"backbone": "convnet", "backbone": "resnet18"}'), "the key 'backbone' appears twice"),
    # weights consistently re-hashed, but not what the backbone's state is
    "weights-float64": (rehashed_weights(as_float64), r"wrong dtype 'block1.conv.weight' 'F64' for F32, .* and \d+ more\)$"),
    "weights-trailing-bytes": (rehashed_weights(lambda w: w + b"\0" * 64), "bytes of tensor data"),
    "weights-truncated": (rehashed_weights(lambda w: w[:5]), "is not a safetensors file"),
    "weights-garbage-header": (rehashed_weights(garbage_header), r"not a safetensors file \(unreadable header\)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_crafted_folder_is_one_encoder_load_error_naming_the_problem(
        tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    tamper, message = CASES[case]
    target = tamper(publish(tmp_path))

    with pytest.raises(EncoderLoadError, match=message) as error:
        load_encoder(target)
    assert "\n" not in str(error.value) and len(str(error.value)) < 600
    assert not isinstance(error.value.__cause__, MemoryError)

    capsys.readouterr()
    assert main(["eval", "--encoder", str(target)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamssl: error: "), lines


def test_the_untampered_folder_its_latest_link_and_a_listed_extra_file_load(tmp_path: Path) -> None:
    folder = publish(tmp_path)
    assert load_encoder(folder).manifest["step"] == 10
    assert load_encoder(folder.parent / "latest").manifest["version"] == 1
    (tmp_path / "mine").symlink_to(folder.parent)  # links above the version folder are the consumer's business
    assert load_encoder(tmp_path / "mine" / "latest").manifest["version"] == 1
    assert "notes/readme.txt" in load_encoder(extra_file(None)(folder)).manifest["files"]  # hashed, inside: fine


def test_the_cli_prints_one_line_for_a_crafted_folder_in_a_real_process(tmp_path: Path) -> None:
    target = CASES["files-dotdot"][0](publish(tmp_path))
    result = subprocess.run([sys.executable, "-m", "streamssl.pipeline.cli", "eval", "--encoder", str(target)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "a path out of the folder" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
