"""Integrity vs authenticity: the sha256 in a manifest catches corruption but not a consistent re-hash; with
STREAMSSL_ENCODER_KEY set, publishing signs manifest.json (HMAC-SHA256) and loading refuses anything else."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from streamssl.models import EncoderLoadError, load_encoder
from streamssl.models.encoder_io import save_encoder
from tests.models.test_encoder_io_crafted import IMAGE_MANIFEST, publish

KEY = "correct horse battery staple"


def swap_weights_and_rehash(folder: Path) -> None:
    """What anyone who can write the folder can do: new weights, and a manifest whose sha256 matches them."""
    tensors = load_safetensors((folder / "encoder.safetensors").read_bytes())
    tensors["block1.conv.weight"] = torch.zeros_like(tensors["block1.conv.weight"])
    weights = save_safetensors(tensors)
    (folder / "encoder.safetensors").write_bytes(weights)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["encoder.safetensors"] = hashlib.sha256(weights).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_without_a_key_a_consistently_rehashed_folder_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The sha256 proves integrity, not authenticity: this is the limit the README states.
    monkeypatch.delenv("STREAMSSL_ENCODER_KEY", raising=False)
    folder = publish(tmp_path)
    swap_weights_and_rehash(folder)
    assert torch.count_nonzero(load_encoder(folder).backbone.block1.conv.weight) == 0
    monkeypatch.setenv("STREAMSSL_ENCODER_KEY", KEY)
    with pytest.raises(EncoderLoadError, match=r"unsigned \(no manifest.json.hmac\), and with STREAMSSL_ENCODER_KEY"):
        load_encoder(folder)


def test_a_key_signs_at_publish_and_verifies_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSSL_ENCODER_KEY", KEY)
    folder = publish(tmp_path)
    manifest = (folder / "manifest.json").read_bytes()
    expected = hmac.new(KEY.encode(), manifest, hashlib.sha256).hexdigest()
    assert (folder / "manifest.json.hmac").read_text() == expected + "\n"  # what `openssl dgst -hmac` prints
    assert load_encoder(folder.parent / "latest").manifest["version"] == 1

    monkeypatch.setenv("STREAMSSL_ENCODER_KEY", "another key")
    with pytest.raises(EncoderLoadError, match=r"manifest.json.hmac: does not match manifest.json under the key"):
        load_encoder(folder)
    monkeypatch.delenv("STREAMSSL_ENCODER_KEY")
    assert load_encoder(folder).manifest["version"] == 1  # a consumer without the key still gets integrity


def test_with_a_key_a_rehashed_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSSL_ENCODER_KEY", KEY)
    folder = publish(tmp_path)
    swap_weights_and_rehash(folder)
    with pytest.raises(EncoderLoadError, match=r"does not match manifest\.json under the key in STREAMSSL_ENCODER_KEY"):
        load_encoder(folder)


@pytest.mark.parametrize(("signature", "message"), [
    (b"", "does not match"),
    (b"0" * 64 + b"\n", "does not match"),
    (b"x" * 4096, "manifest.json.hmac: 4096 bytes, more than the 128"),
    (None, "unsigned"),
])
def test_a_bad_or_missing_signature_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               signature: bytes | None, message: str) -> None:
    monkeypatch.setenv("STREAMSSL_ENCODER_KEY", KEY)
    folder = publish(tmp_path)
    if signature is None:
        (folder / "manifest.json.hmac").unlink()
    else:
        (folder / "manifest.json.hmac").write_bytes(signature)
    with pytest.raises(EncoderLoadError, match=message):
        load_encoder(folder)


def test_a_signature_linked_from_outside_the_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSSL_ENCODER_KEY", KEY)
    folder = publish(tmp_path)
    (folder / "manifest.json.hmac").rename(tmp_path / "stolen.hmac")
    (folder / "manifest.json.hmac").symlink_to(tmp_path / "stolen.hmac")
    with pytest.raises(EncoderLoadError, match=r"manifest\.json\.hmac: resolves to .*outside the encoder folder"):
        load_encoder(folder)


def test_saving_again_without_the_key_leaves_no_stale_signature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSSL_ENCODER_KEY", KEY)
    folder = publish(tmp_path)
    monkeypatch.delenv("STREAMSSL_ENCODER_KEY")
    save_encoder(folder, load_encoder(folder).backbone, IMAGE_MANIFEST)
    assert not (folder / "manifest.json.hmac").exists()
