"""TLS credentials from PEM files, for servers and for the gateway's outbound channels.

Files are read once at start; a rotated certificate takes effect on the next pod start
(Kubernetes rolls pods when the Secret's checksum annotation changes)."""

from __future__ import annotations

from pathlib import Path

import grpc

from copyfree.serving.settings import ServiceSettings


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """None when TLS is off; mutual TLS when tls_client_ca_file is set."""
    if not settings.tls_enabled:
        return None
    key = _read(settings.tls_key_file, "TLS key")
    cert = _read(settings.tls_cert_file, "TLS certificate")
    assert key is not None and cert is not None  # tls_enabled, validated pair
    client_ca = _read(settings.tls_client_ca_file, "client CA")
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(
    ca_file: Path | None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> grpc.ChannelCredentials:
    """Verify servers against ca_file (None = the system roots); present a client
    certificate when cert_file and key_file are given (mutual TLS)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both cert and key files")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "CA"),
        private_key=_read(key_file, "client key"),
        certificate_chain=_read(cert_file, "client certificate"),
    )
