"""Tamper evidence: an HMAC-SHA256 of the manifest, with a key the operator holds.

The manifest lists the sha256 of every file, so signing it covers the whole
checkpoint. Checksums alone catch corruption; anyone who can write the files can
also recompute them. A signature cannot be recomputed without the key.

The key comes from (first match wins): the ``signing_key`` argument, the
``signing_key_file`` argument, the environment variable ``GRADGUARD_CKPT_KEY``
(the key itself, as text), or ``GRADGUARD_CKPT_KEY_FILE`` (a file holding it; one
trailing newline is ignored). With a key, saves are signed and restores refuse
unsigned or mis-signed checkpoints. Without one, signatures are not checked.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import Any

from .errors import CheckpointSignatureError
from .format import canonical_json

KEY_ENV = "GRADGUARD_CKPT_KEY"
KEY_FILE_ENV = "GRADGUARD_CKPT_KEY_FILE"
ALGORITHM = "hmac-sha256"


def resolve_key(key: bytes | str | None = None,
                key_file: str | os.PathLike[str] | None = None) -> bytes | None:
    """The signing key from the arguments or the environment, or None if none is set."""
    if key is not None:
        raw = key.encode() if isinstance(key, str) else bytes(key)
    elif key_file is not None:
        raw = _read_key_file(key_file)
    elif os.environ.get(KEY_ENV):
        raw = os.environ[KEY_ENV].encode()
    elif os.environ.get(KEY_FILE_ENV):
        raw = _read_key_file(os.environ[KEY_FILE_ENV])
    else:
        return None
    if not raw:
        raise ValueError("the checkpoint signing key is empty")
    return raw


def _read_key_file(path: str | os.PathLike[str]) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    return data[:-1] if data.endswith(b"\n") else data


def key_id(key: bytes) -> str:
    """A short fingerprint naming the key in manifests and errors (not the key)."""
    return hmac.new(key, b"gradguard checkpoint key id", hashlib.sha256).hexdigest()[:16]


def _body(manifest: Mapping[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in manifest.items() if k != "signature"})


def sign(manifest: dict[str, Any], key: bytes) -> None:
    """Add ``manifest["signature"]``, an HMAC over everything else in it."""
    manifest["signature"] = {
        "algorithm": ALGORITHM,
        "key_id": key_id(key),
        "value": hmac.new(key, _body(manifest), hashlib.sha256).hexdigest(),
    }


def check(manifest: Mapping[str, Any], key: bytes, where: str) -> None:
    """Raise :class:`CheckpointSignatureError` unless ``manifest`` is signed with ``key``."""
    signature = manifest.get("signature")
    if not isinstance(signature, dict):
        raise CheckpointSignatureError(
            f"{where} is not signed, and a signing key is configured "
            f"({KEY_ENV} / key file): refused", path=where)
    if signature.get("algorithm") != ALGORITHM:
        raise CheckpointSignatureError(f"{where} is signed with {signature.get('algorithm')!r}, "
                                       f"expected {ALGORITHM}: refused", path=where)
    expected = hmac.new(key, _body(manifest), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(str(signature.get("value", "")), expected):
        other = signature.get("key_id") != key_id(key)
        why = (f"it was signed with another key (key id {signature.get('key_id')}, "
               f"configured key id {key_id(key)})" if other
               else "the manifest was changed after signing")
        raise CheckpointSignatureError(f"{where}: bad signature, {why}: refused", path=where)
