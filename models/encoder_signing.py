"""Optional authenticity for published encoders: an HMAC-SHA256 of manifest.json under a shared secret key.

The sha256 of each file in a manifest detects corruption, not tampering: whoever can write the folder can
change the weights and re-hash them. With the key in STREAMSSL_ENCODER_KEY, `save_encoder` also writes
`manifest.json.hmac` (the hex HMAC of manifest.json's exact bytes, which hold the weights' sha256, so it
covers them too), and `load_encoder` refuses any folder without a matching one. The same check by hand:
`openssl dgst -sha256 -hmac "$STREAMSSL_ENCODER_KEY" manifest.json`.
"""

from __future__ import annotations

import hashlib
import hmac
import os

KEY_ENV = "STREAMSSL_ENCODER_KEY"
SIGNATURE_FILE = "manifest.json.hmac"
MAX_SIGNATURE_BYTES = 128  # 64 hex digits, a newline, room for stray whitespace


def signing_key() -> bytes | None:
    """The key from STREAMSSL_ENCODER_KEY, or None where it is unset or empty (no signing, no verifying)."""
    value = os.environ.get(KEY_ENV, "")
    return os.fsencode(value) if value else None


def sign(manifest: bytes, key: bytes) -> str:
    """What SIGNATURE_FILE holds for these manifest.json bytes."""
    return hmac.new(key, manifest, hashlib.sha256).hexdigest() + "\n"


def signature_matches(manifest: bytes, signature: bytes, key: bytes) -> bool:
    """Whether `signature` (SIGNATURE_FILE's bytes) is the HMAC of `manifest`; constant-time."""
    return hmac.compare_digest(sign(manifest, key).strip().encode(), signature.strip())
