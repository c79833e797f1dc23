"""The coordinator's transport security: TLS credentials from its config, and the rule that
plaintext on any address but loopback must be asked for (`coordinator.insecure`).

Islands and operators authenticate twice: the TLS layer checks the client certificate against
the run's CA (mutual TLS, when `coordinator.tls_ca` is set), and every RPC checks its island token
or the admin credential. The first keeps strangers off the port; the second says who may do what.
"""

from __future__ import annotations

import ipaddress
import logging

import grpc

from archipelago.config import ConfigError
from coordinator.config import CoordinatorConfig
from protos.transport import read_pem

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for localhost and the loopback ranges (127.0.0.0/8, ::1); False for anything that may
    be reachable from another machine, including the wildcard addresses and other host names."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_credentials(cfg: CoordinatorConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the server, or None to serve plaintext (allowed, with a warning, on
    loopback or with `insecure`); ConfigError when plaintext would be served to the network."""
    if not cfg.tls_cert:
        if not cfg.insecure and not is_loopback(cfg.host):
            raise ConfigError(
                f"coordinator.host {cfg.host!r} is not a loopback address and no certificate is configured: "
                "give coordinator.tls_cert, tls_key and tls_ca (`archipelago coordinator certs` writes a set), "
                "or serve without TLS on purpose with --insecure (coordinator.insecure = true)")
        log.warning("serving WITHOUT TLS on %s:%s%s: tokens, the admin credential and pseudo-gradients cross "
                    "the network in plaintext, and any client may connect", cfg.host, cfg.port,
                    " (--insecure)" if cfg.insecure else " (loopback only)")
        return None
    key = read_pem(cfg.tls_key, "coordinator.tls_key")
    cert = read_pem(cfg.tls_cert, "coordinator.tls_cert")
    ca = read_pem(cfg.tls_ca, "coordinator.tls_ca") if cfg.tls_ca else None
    if ca is None:
        log.warning("TLS without client certificates: any client that trusts the server's certificate may "
                    "connect; set coordinator.tls_ca for mutual TLS")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
