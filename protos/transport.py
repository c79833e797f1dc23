"""How a client opens its gRPC channel to the coordinator: plaintext, or TLS with the run's CA.

Both islands and operators' tools call `open_channel`. With a CA the server is verified against
it (not the system roots); with a certificate and key as well, the client presents them, which a
coordinator holding a CA requires (mutual TLS). Without any of the three the channel is plaintext.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from archipelago.errors import UserError


def read_pem(path: str, what: str) -> bytes:
    """The bytes of a PEM file; UserError naming ``what`` and the path if it is missing or not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"{what} {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise UserError(f"{what} {path} is not a PEM file")
    return data


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM paths; None when all three are empty (a plaintext channel)."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise UserError("a TLS client certificate and its key go together: give both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, "TLS CA certificate (tls_ca)") if ca else None,
        private_key=read_pem(key, "TLS client key (tls_key)") if key else None,
        certificate_chain=read_pem(cert, "TLS client certificate (tls_cert)") if cert else None)


def open_channel(address: str, options: list[tuple[str, int]] | None = None, *, ca: str = "", cert: str = "",
                 key: str = "") -> grpc.Channel:
    """A channel to ``address``: TLS when any of ``ca``/``cert``/``key`` is given, else plaintext."""
    credentials = channel_credentials(ca, cert, key)
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)
