"""Provider credentials encrypted at rest: AES-256-GCM with the registry key.

A literal ``api_key`` is stored as ``enc:v1:<base64url(nonce | ciphertext+tag)>``; the instance's name is the
associated data, so a sealed value copied to another row does not open. References (``env:NAME``,
``file:/path``) name where a secret is, not the secret: they stay readable. The key is 32 random bytes kept
base64 in ``$ISHGW_HOME/secrets/registry.key`` (0600) or ISHGW_REGISTRY_KEY_FILE; the registry records only
the key's id (a keyed hash that tells keys apart and reveals nothing of them).

``seal``/``unseal`` are pure given the key and a nonce source; ``load_key``/``create_key`` are the effects.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from control_plane.registry import validators as v

PREFIX = "enc:v1:"
KEY_BYTES = 32
NONCE_BYTES = 12
_AAD_PREFIX = b"ishgw/instances/api_key/"
_ID_LABEL = b"ishgw registry key id v1"


class RegistryKeyError(Exception):
    """The registry key is missing, unreadable, malformed or not the one the registry was sealed with.
    Messages name files and key ids, never key material."""


def is_sealed(value: str | None) -> bool:
    return value is not None and value.startswith(PREFIX)


def needs_sealing(value: str | None) -> bool:
    """A literal key in clear (not a reference, not already sealed)."""
    return value is not None and not is_sealed(value) and not v.SECRET_REF_RE.fullmatch(value)


def key_id(key: bytes) -> str:
    return hashlib.sha256(_ID_LABEL + key).hexdigest()[:16]


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Sealer:
    key: bytes = field(repr=False)
    nonce: Callable[[], bytes] = field(default=lambda: os.urandom(NONCE_BYTES), repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise RegistryKeyError(f"a registry key has {KEY_BYTES} bytes, not {len(self.key)}")

    @property
    def key_id(self) -> str:
        return key_id(self.key)

    def seal(self, name: str, value: str) -> str:
        nonce = self.nonce()
        sealed = AESGCM(self.key).encrypt(nonce, value.encode(), _AAD_PREFIX + name.encode())
        return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def unseal(self, name: str, value: str) -> str:
        try:
            raw = _b64decode(value[len(PREFIX) :])
            plain = AESGCM(self.key).decrypt(
                raw[:NONCE_BYTES], raw[NONCE_BYTES:], _AAD_PREFIX + name.encode()
            )
        except (InvalidTag, ValueError, binascii.Error) as exc:
            raise RegistryKeyError(
                f"the api_key of instance {name!r} does not open with registry key {self.key_id}"
                " (another key, or a damaged value)"
            ) from exc
        return plain.decode()


def parse_key(text: str, where: str) -> bytes:
    try:
        key = _b64decode(text.strip())
    except (ValueError, binascii.Error):
        key = b""
    if len(key) != KEY_BYTES:
        raise RegistryKeyError(f"{where} does not hold a registry key ({KEY_BYTES} bytes, base64)")
    return key


def load_key(path: Path) -> Sealer:
    """Raises FileNotFoundError when there is no key file, RegistryKeyError when it is unusable."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise RegistryKeyError(f"{path} cannot be read ({exc.strerror})") from exc
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o600)
    return Sealer(parse_key(text, str(path)))


def create_key(path: Path) -> Sealer:
    """A new random key in a new 0600 file (never replaces one: O_EXCL)."""
    key = os.urandom(KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.urlsafe_b64encode(key).decode() + "\n")
    return Sealer(key)


def registry_sealer(path: Path, sealed_with: str | None) -> Sealer:
    """The key for a registry whose provider keys were sealed with key id ``sealed_with`` (None: never
    sealed). A missing file is created only for a registry that has never been sealed: a new key could not
    open what the old one sealed."""
    try:
        sealer = load_key(path)
    except FileNotFoundError:
        if sealed_with is not None:
            raise RegistryKeyError(
                f"{path} is missing, and the registry's provider keys are encrypted with registry key"
                f" {sealed_with}: put that key file back (a backup made with --with-secrets holds it),"
                " or point ISHGW_REGISTRY_KEY_FILE at it"
            ) from None
        return create_key(path)
    if sealed_with is not None and sealer.key_id != sealed_with:
        raise RegistryKeyError(
            f"{path} holds registry key {sealer.key_id}, but the registry's provider keys are encrypted with"
            f" key {sealed_with}: put the matching key file in place"
        )
    return sealer
