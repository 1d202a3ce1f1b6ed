"""Provider keys sealed at rest (registry/sealing.py): round trips, binding to the instance, key handling."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from control_plane.registry.sealing import (
    KEY_BYTES,
    PREFIX,
    RegistryKeyError,
    Sealer,
    create_key,
    is_sealed,
    load_key,
    needs_sealing,
    parse_key,
    registry_sealer,
)

KEY = bytes(range(KEY_BYTES))
SECRET = "sk-live-0123456789abcdef"


def test_round_trip_and_no_clear_text() -> None:
    sealer = Sealer(KEY)
    sealed = sealer.seal("inst-a", SECRET)
    assert sealed.startswith(PREFIX) and is_sealed(sealed)
    assert SECRET not in sealed and SECRET[-8:] not in sealed
    assert sealer.unseal("inst-a", sealed) == SECRET


def test_fresh_nonce_per_value() -> None:
    sealer = Sealer(KEY)
    assert sealer.seal("a", SECRET) != sealer.seal("a", SECRET)


def test_bound_to_the_instance_name() -> None:
    sealed = Sealer(KEY).seal("inst-a", SECRET)
    with pytest.raises(RegistryKeyError, match="inst-b"):
        Sealer(KEY).unseal("inst-b", sealed)


def test_another_key_does_not_open_and_says_which_key() -> None:
    sealed = Sealer(KEY).seal("a", SECRET)
    other = Sealer(bytes(KEY_BYTES))
    with pytest.raises(RegistryKeyError, match=other.key_id):
        other.unseal("a", sealed)


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s[:-1],
        lambda s: s[:-2] + ("A" if s[-2] != "A" else "B") + s[-1],
        lambda s: PREFIX + "!!",
        lambda s: PREFIX,
    ],
)
def test_damaged_values_are_refused(damage: object) -> None:
    sealed = Sealer(KEY).seal("a", SECRET)
    with pytest.raises(RegistryKeyError):
        Sealer(KEY).unseal("a", damage(sealed))  # type: ignore[operator]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        (SECRET, True),
        ("env:OPENAI_KEY", False),
        ("file:/run/keys/x", False),
        (PREFIX + "abc", False),
    ],
)
def test_needs_sealing(value: str | None, expected: bool) -> None:
    assert needs_sealing(value) is expected


def test_key_id_tells_keys_apart_and_hides_the_key() -> None:
    a, b = Sealer(KEY), Sealer(bytes(KEY_BYTES))
    assert a.key_id != b.key_id and len(a.key_id) == 16
    assert a.key_id not in KEY.hex() and a.key_id not in base64.b64encode(KEY).decode()
    assert "key=" not in repr(a) and KEY.hex() not in repr(a)


@pytest.mark.parametrize("text", ["", "short", base64.b64encode(b"x" * 31).decode(), "%%%%"])
def test_malformed_key_text(text: str) -> None:
    with pytest.raises(RegistryKeyError, match="does not hold a registry key"):
        parse_key(text, "the file")


def test_create_then_load(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "registry.key"
    created = create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(path).key_id == created.key_id
    with pytest.raises(FileExistsError):
        create_key(path)


def test_load_tightens_a_loose_mode(tmp_path: Path) -> None:
    path = tmp_path / "registry.key"
    create_key(path)
    path.chmod(0o644)
    load_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_registry_sealer_creates_a_key_only_for_a_never_sealed_registry(tmp_path: Path) -> None:
    path = tmp_path / "registry.key"
    first = registry_sealer(path, None)
    assert registry_sealer(path, first.key_id).key_id == first.key_id
    path.unlink()
    with pytest.raises(RegistryKeyError, match=f"missing.*{first.key_id}.*--with-secrets"):
        registry_sealer(path, first.key_id)
    assert not path.exists()


def test_registry_sealer_refuses_another_key(tmp_path: Path) -> None:
    path = tmp_path / "registry.key"
    registry_sealer(path, None)
    with pytest.raises(RegistryKeyError, match=r"0123456789abcdef|encrypted with key"):
        registry_sealer(path, "0123456789abcdef")
