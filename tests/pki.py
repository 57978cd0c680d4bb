"""Test certificates made with the openssl CLI: a CA, a server and a client certificate it signed, and a
stranger's from another CA (for the handshakes that must fail)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # signed by another CA
    stranger_key: Path


def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "the openssl CLI is needed to make test certificates"
    subprocess.run([openssl, *args], check=True, capture_output=True, timeout=OPENSSL_TIMEOUT_S)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
             "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert))
    return cert, key


def make_leaf(directory: Path, name: str, ca: tuple[Path, Path], extension: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
             "-subj", f"/CN={name}", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-addext", extension,
             "-keyout", str(key), "-out", str(cert))
    return cert, key


def make_pki(directory: Path, server_names: str = "IP:127.0.0.1,DNS:localhost") -> Pki:
    """A server certificate for `server_names` (subjectAltName entries), a client one, and a stranger's."""
    ca, other_ca = make_ca(directory, "test-ca"), make_ca(directory, "other-ca")
    server = make_leaf(directory, "router", ca, f"subjectAltName={server_names}")
    client = make_leaf(directory, "client", ca, "extendedKeyUsage=clientAuth")
    stranger = make_leaf(directory, "stranger", other_ca, "extendedKeyUsage=clientAuth")
    return Pki(ca[0], *server, *client, *stranger)
