"""TLS for the gRPC port, with certificates reloaded when their files change.

gRPC asks `fetch` on every new handshake (dynamic server credentials), so a rotated certificate —
cert-manager rewriting a mounted Secret, say — is served to new connections without a restart, while
open streams keep the connection they have. A half-written rotation (a file missing or unreadable)
keeps the previous certificates until the next handshake finds the files whole.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from quantrouter.config import ConfigError

__all__ = ["ReloadingCertificates", "channel_credentials", "server_credentials"]

log = logging.getLogger(__name__)


class ReloadingCertificates:
    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self._cert, self._key, self._client_ca = cert, key, client_ca
        self._stamp = self._mtimes()

    def _mtimes(self) -> tuple[int, ...]:
        return tuple(p.stat().st_mtime_ns for p in (self._cert, self._key, self._client_ca) if p is not None)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self._key.read_bytes(), self._cert.read_bytes())],
            root_certificates=self._client_ca.read_bytes() if self._client_ca else None)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """New certificates when the files changed since the last read, else None (keep the current ones)."""
        try:
            stamp = self._mtimes()
            if stamp == self._stamp:
                return None
            configuration = self.configuration()
        except OSError as error:
            log.warning("TLS certificates unreadable, keeping the previous ones: %s", error)
            return None
        self._stamp = stamp
        log.info("TLS certificates reloaded from %s", self._cert)
        return configuration


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS, or mutual TLS when `client_ca` is given, reloading the files on change."""
    certificates = ReloadingCertificates(cert, key, client_ca)
    return grpc.dynamic_ssl_server_credentials(certificates.configuration(), certificates.fetch,
                                               require_client_authentication=client_ca is not None)


def channel_credentials(ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    """TLS for calls out (the fleet to its nodes): trust `ca`, and present `cert` when the peer asks for one.
    Read once; a rotated client certificate takes a restart (peers keep serving open connections)."""
    try:
        return grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes() if key else None,
                                            cert.read_bytes() if cert else None)
    except OSError as error:
        raise ConfigError(f"cannot read a TLS file for the node connections: {error}") from None
