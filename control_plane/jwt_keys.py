"""JWT verification keys from files: an HS256 secret, PEM public keys, a JWKS document.

gw.crypto (LuaJIT FFI to OpenSSL) loads public keys as SPKI DER (d2i_PUBKEY), so JWKS keys are converted
here to SPKI DER with a small DER encoder; PEM keys are checked (RSA >= 2048 bits, EC on P-256) and passed
on as DER.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from pathlib import Path
from typing import Any

from control_plane.render.client_access import JwtFiles, JwtKeys, PublicKey

log = logging.getLogger(__name__)

MIN_HS256_SECRET = 32
MIN_RSA_BITS = 2048
OID_RSA = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1 rsaEncryption
OID_EC = bytes.fromhex("2a8648ce3d0201")  # 1.2.840.10045.2.1 ecPublicKey
OID_P256 = bytes.fromhex("2a8648ce3d030107")  # 1.2.840.10045.3.1.7 prime256v1
PEM_RE = re.compile(r"-----BEGIN (PUBLIC KEY|RSA PUBLIC KEY)-----(.*?)-----END \1-----", re.S)
KID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")


class JwtConfigError(ValueError):
    pass


# -- DER -----------------------------------------------------------------------------------------------------


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _len(len(content)) + content


def _int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    return _tlv(0x02, b"\x00" + body if body[0] & 0x80 else body)


def _seq(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def _read(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, content, next position) of the TLV at ``pos``."""
    if pos + 2 > len(data):
        raise JwtConfigError("truncated DER")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first & 0x80:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise JwtConfigError("bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    else:
        length = first
    if pos + length > len(data):
        raise JwtConfigError("truncated DER")
    return tag, data[pos : pos + length], pos + length


def rsa_spki(n: int, e: int) -> bytes:
    pkcs1 = _seq(_int(n), _int(e))
    return _seq(_seq(_tlv(0x06, OID_RSA), b"\x05\x00"), _tlv(0x03, b"\x00" + pkcs1))


def ec_spki(x: bytes, y: bytes) -> bytes:
    point = b"\x04" + x.rjust(32, b"\x00") + y.rjust(32, b"\x00")
    return _seq(_seq(_tlv(0x06, OID_EC), _tlv(0x06, OID_P256)), _tlv(0x03, b"\x00" + point))


def spki_alg(der: bytes) -> str:
    """RS256 or ES256 for an SPKI public key; anything else is refused."""
    tag, outer, _ = _read(der, 0)
    if tag != 0x30:
        raise JwtConfigError("not an SPKI public key")
    tag, algorithm, pos = _read(outer, 0)
    tag_bits, bits, _ = _read(outer, pos)
    if tag != 0x30 or tag_bits != 0x03 or not bits or bits[0] != 0:
        raise JwtConfigError("not an SPKI public key")
    _, oid, pos = _read(algorithm, 0)
    if oid == OID_RSA:
        _, pkcs1, _ = _read(bits[1:], 0)
        _, modulus, _ = _read(pkcs1, 0)
        size = int.from_bytes(modulus, "big").bit_length()
        if size < MIN_RSA_BITS:
            raise JwtConfigError(f"RSA key of {size} bits; at least {MIN_RSA_BITS} needed")
        return "RS256"
    if oid == OID_EC:
        _, curve, _ = _read(algorithm, pos)
        if curve != OID_P256 or len(bits) != 66:
            raise JwtConfigError("EC keys must be on P-256 (ES256)")
        return "ES256"
    raise JwtConfigError("only RSA (RS256) and P-256 (ES256) public keys are supported")


# -- files ---------------------------------------------------------------------------------------------------


def _b64url_int(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise JwtConfigError(f"JWK field {what} missing")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise JwtConfigError(f"JWK field {what} is not base64url") from None


def _kid(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not KID_RE.fullmatch(value):
        raise JwtConfigError("a JWK kid must be 1-128 printable ASCII characters")
    return value


def jwk_key(jwk: dict[str, Any]) -> PublicKey | None:
    """One JWK as a verification key; None for keys not meant for signatures (use != sig)."""
    if jwk.get("use") not in (None, "sig"):
        return None
    kty, kid = jwk.get("kty"), _kid(jwk.get("kid"))
    if kty == "RSA":
        n = int.from_bytes(_b64url_int(jwk.get("n"), "n"), "big")
        der = rsa_spki(n, int.from_bytes(_b64url_int(jwk.get("e"), "e"), "big"))
    elif kty == "EC" and jwk.get("crv") == "P-256":
        x, y = _b64url_int(jwk.get("x"), "x"), _b64url_int(jwk.get("y"), "y")
        if len(x) > 32 or len(y) > 32:
            raise JwtConfigError("P-256 coordinates are 32 bytes")
        der = ec_spki(x, y)
    else:
        raise JwtConfigError(f"unsupported JWK (kty {kty!r}): only RSA and EC P-256")
    alg = spki_alg(der)
    if jwk.get("alg") not in (None, alg):
        raise JwtConfigError(f"JWK {kid or ''} says alg {jwk.get('alg')!r}; its key is for {alg}")
    return PublicKey(alg=alg, spki_b64=base64.b64encode(der).decode(), kid=kid)


def parse_jwks(text: str) -> tuple[PublicKey, ...]:
    try:
        doc = json.loads(text)
    except ValueError:
        raise JwtConfigError("the JWKS file is not JSON") from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise JwtConfigError('a JWKS document is {"keys": [...]}')
    return tuple(key for jwk in keys if (key := jwk_key(jwk)) is not None)


def parse_pem(text: str) -> tuple[PublicKey, ...]:
    keys = []
    for kind, body in PEM_RE.findall(text):
        try:
            der = base64.b64decode("".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raise JwtConfigError("a PEM block is not base64") from None
        if kind == "RSA PUBLIC KEY":  # PKCS#1: wrap it as SPKI
            der = _seq(_seq(_tlv(0x06, OID_RSA), b"\x05\x00"), _tlv(0x03, b"\x00" + der))
        keys.append(PublicKey(alg=spki_alg(der), spki_b64=base64.b64encode(der).decode()))
    if not keys:
        raise JwtConfigError("no PEM public key (-----BEGIN PUBLIC KEY-----) in the file")
    return tuple(keys)


def read_secret(path: str) -> str:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise JwtConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        secret = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise JwtConfigError(f"{path} is not UTF-8 text") from None
    if len(secret.encode()) < MIN_HS256_SECRET:
        raise JwtConfigError(f"the HS256 secret in {path} is shorter than {MIN_HS256_SECRET} bytes")
    return secret


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise JwtConfigError(f"cannot read {path}: {exc}") from None


def load(files: JwtFiles) -> JwtKeys | None:
    """The configured key material; None when no JWT file is configured. Raises JwtConfigError."""
    if not files.any:
        return None
    secret = read_secret(files.hs256_secret) if files.hs256_secret else None
    public: tuple[PublicKey, ...] = ()
    if files.public_keys:
        public += parse_pem(_read_text(files.public_keys))
    if files.jwks:
        public += parse_jwks(_read_text(files.jwks))
    return JwtKeys(hs256_secret=secret, public_keys=public)


def load_or_none(files: JwtFiles) -> JwtKeys | None:
    """For the reconcile loop: a broken file switches JWT acceptance off (fail closed) and says so."""
    try:
        return load(files)
    except JwtConfigError as exc:
        log.error("JWT keys unusable, JWT bearer tokens are refused until fixed: %s", exc)
        return None
