"""A run's own certificate authority and the certificates it signs, for mutual TLS.

    DIR/ca.crt, ca.key            the CA: every party trusts ca.crt; keep ca.key off the servers
    DIR/server.crt, server.key    the coordinator's; subject alternative names from `hosts`
    DIR/ISLAND.crt, ISLAND.key    one client certificate per island (common name: the island id)
    DIR/admin.crt, admin.key      a client certificate for operators' tools (coordinator status)

Keys are ECDSA P-256 and written with mode 0600, certificates 0644, each to a temporary name and
renamed. A CA already in DIR is reused, so a later call adds islands to the same run.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from archipelago.errors import UserError

RESERVED = ("ca", "server", "admin")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Issued:
    """One written certificate: what it is for and its two files."""

    role: str  # ca | server | island | admin
    name: str
    cert: Path
    key: Path


def island_names(spec: str) -> list[str]:
    """``"3"`` → island-0, island-1, island-2; ``"a,b"`` → a, b (each usable as a file name)."""
    spec = spec.strip()
    if spec.isdigit():
        return [f"island-{i}" for i in range(int(spec))]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        if not _NAME.fullmatch(name) or name in RESERVED:
            raise UserError(f"island name {name!r} must be letters, digits, '.', '_' or '-' (at most 128) "
                            f"and not one of {list(RESERVED)}")
    if len(set(names)) != len(names):
        raise UserError(f"island names repeat: {spec}")
    return names


def subject_alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    """IP addresses as IPAddress names, everything else as DNS names."""
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "archipelago"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _certificate(common_name: str, key: ec.EllipticCurvePrivateKey, days: int,
                 issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
                 usage: x509.ObjectIdentifier | None = None,
                 sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    """A certificate for ``key``: self-signed CA when ``issuer`` is None, else a leaf it signs."""
    now = datetime.now(timezone.utc)
    ca = issuer is None
    signer = key if issuer is None else issuer[1]
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name))
               .issuer_name(_name(common_name) if issuer is None else issuer[0].subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5))  # tolerate a little clock skew
               .not_valid_after(now + timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(_key_usage(ca), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                              critical=False))
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` with permissions ``mode`` from the first byte on, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; a leftover tmp may have had another
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _save(out: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    key_path, cert_path = out / f"{stem}.key", out / f"{stem}.crt"
    _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def _load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert_path, key_path = out / "ca.crt", out / "ca.key"
    if not cert_path.exists() and not key_path.exists():
        return None
    if not (cert_path.exists() and key_path.exists()):
        raise UserError(f"{out} holds only one of ca.crt and ca.key: remove it or restore the other")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as exc:
        raise UserError(f"the CA in {out} cannot be read: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise UserError(f"{out}/ca.key is not the key of {out}/ca.crt")
    return cert, key


def make_certs(out: str | Path, hosts: list[str], islands: list[str], days: int = 365) -> list[Issued]:
    """Write (or reuse) the CA, then the server, island and admin certificates; what was written."""
    if not hosts:
        raise UserError("--hosts needs at least one host name or address for the server certificate")
    if days < 1:
        raise UserError(f"--days must be >= 1, got {days}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    issued = []
    ca = _load_ca(out)
    if ca is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (_certificate("archipelago run CA", ca_key, days, None), ca_key)
        issued.append(Issued("ca", "archipelago run CA", *_save(out, "ca", *ca)))
    leaves = [("server", "server", hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, subject_alt_names(hosts))]
    leaves += [("island", name, name, ExtendedKeyUsageOID.CLIENT_AUTH, None) for name in islands]
    leaves.append(("admin", "admin", "admin", ExtendedKeyUsageOID.CLIENT_AUTH, None))
    for role, stem, common_name, usage, sans in leaves:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(common_name, key, days, ca, usage, sans)
        issued.append(Issued(role, common_name, *_save(out, stem, cert, key)))
    return issued
