"""Throwaway self-signed certificates for tests and benchmarks (openssl, EC P-256)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def make_self_signed(cert: Path, key: Path, common_name: str = "127.0.0.1", days: int = 2) -> None:
    """A self-signed certificate for ``common_name`` and 127.0.0.1; the key file is 0600."""
    cert.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            str(days),
            "-subj",
            f"/CN={common_name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    os.chmod(key, 0o600)
