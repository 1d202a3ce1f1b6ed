"""The pure parts of backups (control_plane/backup.py): the manifest check, gateway.env handling, names."""

from __future__ import annotations

import gzip
import io
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from control_plane import backup as b

KEY_ID = "0123456789abcdef"
EXPECT = b.Expect(
    schema_version=3, database="sqlite", local_key_id=KEY_ID, key_path="/h/secrets/registry.key"
)


def manifest(**overrides: Any) -> tuple[dict[str, Any], dict[str, tuple[str, int]]]:
    members = {b.SQLITE_MEMBER: b"db", "files/gateway.env": b"ISHGW_HOME=/h\n"}
    digests = {name: (b.sha256(data), len(data)) for name, data in members.items()}
    value: dict[str, Any] = {
        "format": b.FORMAT,
        "format_version": b.FORMAT_VERSION,
        "schema_version": 3,
        "database": "sqlite",
        "with_secrets": False,
        "registry_key_id": KEY_ID,
        "files": {name: {"sha256": d, "size": n} for name, (d, n) in digests.items()},
    }
    value.update(overrides)
    return value, digests


def test_a_good_manifest_passes() -> None:
    assert b.check_manifest(*manifest(), EXPECT) == []


@pytest.mark.parametrize("value", [None, [], "x", {"format": "tar"}, {}])
def test_foreign_manifests(value: Any) -> None:
    assert b.check_manifest(value, {}, EXPECT) == [
        "not an ISH Gateway backup (its manifest.json does not say format ish-gateway-backup)"
    ]


def test_a_changed_member_is_named() -> None:
    value, digests = manifest()
    digests["files/gateway.env"] = (b.sha256(b"other"), 5)
    assert b.check_manifest(value, digests, EXPECT) == [
        "files/gateway.env: checksum mismatch (the archive is damaged or was altered)"
    ]


def test_missing_and_extra_members() -> None:
    value, digests = manifest()
    del digests["files/gateway.env"]
    digests["files/evil"] = ("0", 1)
    problems = b.check_manifest(value, digests, EXPECT)
    assert "files/gateway.env: listed in the manifest, missing from the archive" in problems
    assert "files/evil: in the archive, not in the manifest" in problems


def test_newer_schema_and_format_and_other_database() -> None:
    value, digests = manifest(schema_version=9, format_version=2, database="postgresql")
    text = "\n".join(b.check_manifest(value, digests, EXPECT))
    assert "registry schema 9 is newer than this gateway's (3): update first" in text
    assert "archive format version 2" in text
    assert "holds a postgresql registry; this gateway uses sqlite" in text


def test_without_secrets_needs_the_same_key_in_place() -> None:
    value, digests = manifest()
    for local, says in ((None, "does not exist"), ("ffffffffffffffff", "holds key ffffffffffffffff")):
        expect = b.Expect(3, "sqlite", local, "/h/secrets/registry.key")
        [problem] = b.check_manifest(value, digests, expect)
        assert f"needs registry key {KEY_ID} at /h/secrets/registry.key, which {says}" in problem
        assert "--with-secrets" in problem


def test_with_secrets_needs_no_local_key_but_its_own() -> None:
    value, digests = manifest(with_secrets=True)
    expect = b.Expect(3, "sqlite", None, "/k")
    assert b.check_manifest(value, digests, expect) == [
        f"the manifest says with secrets, but {b.REGISTRY_KEY_MEMBER} is missing"
    ]
    value["files"][b.REGISTRY_KEY_MEMBER] = {"sha256": b.sha256(b"k"), "size": 1}
    digests[b.REGISTRY_KEY_MEMBER] = (b.sha256(b"k"), 1)
    assert b.check_manifest(value, digests, expect) == []


def test_a_registry_never_sealed_restores_anywhere() -> None:
    value, digests = manifest(registry_key_id=None)
    assert b.check_manifest(value, digests, b.Expect(3, "sqlite", None, "/k")) == []


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("manifest.json", True),
        (b.SQLITE_MEMBER, True),
        (b.PG_MEMBER, True),
        ("files/gateway.env", True),
        ("files/provider.env", True),
        ("files/ssl/cert.pem", True),
        ("files/secrets/registry.key", True),
        ("files/secrets/admin_api_key", True),
        ("files/secrets/providers/openai/key", True),
        ("/etc/passwd", False),
        ("files/../../etc/passwd", False),
        ("files/ssl/../gateway.env", False),
        ("files//gateway.env", False),
        ("./manifest.json", False),
        ("other/x", False),
        ("registry/other.db", False),
        ("files/nginx/live/nginx.conf", False),
        ("files/controller.pid", False),
        ("files/ssl/sub/cert.pem", False),
        ("files/secrets/other", False),
        ("files/secrets/providers", False),
    ],
)
def test_safe_member(name: str, ok: bool) -> None:
    assert b.safe_member(name) is ok


def test_without_secrets_drops_the_admin_key_only() -> None:
    text = "# header\nISHGW_ADMIN_API_KEY=sekrit-admin-key-0123456789\nISHGW_HTTP_PORT=8080\n"
    assert b.without_secrets(text) == "# header\nISHGW_HTTP_PORT=8080\n"


def test_merged_gateway_env_keeps_local_settings() -> None:
    archived = "# a\nISHGW_HOME=/old\nISHGW_HTTP_PORT=9999\nISHGW_DB_URL=sqlite:////old/ishgw.db\n"
    current = "ISHGW_HOME=/new\nISHGW_HTTP_PORT=8080\nISHGW_ADMIN_API_KEY=current-admin-key-0123456\n"
    merged = b.merged_gateway_env(archived, current, with_secrets=False)
    assert (
        merged
        == "# a\nISHGW_HTTP_PORT=9999\nISHGW_ADMIN_API_KEY=current-admin-key-0123456\nISHGW_HOME=/new\n"
    )
    with_secrets = b.merged_gateway_env(
        archived + "ISHGW_ADMIN_API_KEY=archived-admin-key-01234\n", current, True
    )
    assert "ISHGW_ADMIN_API_KEY=archived-admin-key-01234" in with_secrets
    assert "current-admin-key" not in with_secrets


def test_backup_names_and_pruning() -> None:
    names = [b.backup_file_name(datetime(2026, 1, day, 3, 4, 5, tzinfo=UTC)) for day in (3, 1, 2)]
    assert names[1] == "ishgw-20260101T030405Z.tar.gz"
    others = ["manual-20250101T000000Z.tar.gz", "notes.txt", ".backup-x.tar.gz"]
    assert b.to_prune([*names, *others], keep=2) == ["ishgw-20260101T030405Z.tar.gz"]
    assert b.to_prune(names, keep=5) == []


def _small_archive(path: Path) -> bytes:
    with tarfile.open(path, "w:gz") as tar:
        for name, body in (
            ("manifest.json", b'{"format": 1, "files": {}}'),
            ("files/gateway.env", b"A=1\n" * 40),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return path.read_bytes()


def test_a_flipped_byte_anywhere_past_the_gzip_header_is_damage(tmp_path: Path) -> None:
    good = _small_archive(tmp_path / "good.tar.gz")
    assert b.read_archive(tmp_path / "good.tar.gz").manifest == {"format": 1, "files": {}}
    # Past the header (10 bytes, then the original file name: a flip there changes only the name): every
    # byte of the compressed blocks and of the CRC/length trailer.
    assert good[3] == 0x08  # FNAME only
    for position in range(good.index(b"\0", 10) + 1, len(good)):
        data = bytearray(good)
        data[position] ^= 0xFF
        damaged = tmp_path / "damaged.tar.gz"
        damaged.write_bytes(bytes(data))
        with pytest.raises(b.BackupError, match="the archive is damaged"):
            b.read_archive(damaged)


def test_what_is_not_gzip_or_not_there(tmp_path: Path) -> None:
    (tmp_path / "text.tar.gz").write_text("hello\n")
    with pytest.raises(b.BackupError, match="not a gzip tar archive"):
        b.read_archive(tmp_path / "text.tar.gz")
    (tmp_path / "plain.tar.gz").write_bytes(gzip.compress(b"plain text, not a tar"))
    with pytest.raises(b.BackupError, match="not a gzip tar archive"):
        b.read_archive(tmp_path / "plain.tar.gz")
    with pytest.raises(b.BackupError, match="no such file"):
        b.read_archive(tmp_path / "absent.tar.gz")
