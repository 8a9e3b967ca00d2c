"""Throwaway TLS material for the local secured broker and the tests: a CA and one server cert.

Made with ``cryptography`` for one run, never for production. Kafka 4 reads PEM directly
(``ssl.keystore.type=PEM``): the server file holds the unencrypted PKCS#8 key followed by the
certificate and the CA's, the CA file is the clients' ``ssl.ca.location``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_VALID_FOR = dt.timedelta(days=30)


@dataclass(frozen=True)
class TlsFiles:
    """Where the generated PEM files are.

    Attributes:
        ca: the CA certificate (clients trust it: ``ssl.ca.location``).
        server: the server's PKCS#8 key, its certificate and the CA's, in that order.
        server_cert: the server's certificate chain alone (HTTPS servers).
        server_key: the server's key alone (HTTPS servers).
    """

    ca: Path
    server: Path
    server_cert: Path
    server_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_tls(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """Create a CA and a server certificate for ``hosts`` (IPs or DNS names) in ``folder``.

    Args:
        folder: created if missing; the key files are readable by their owner only.
        hosts: the server's subject alternative names (clients verify the host name).

    Returns:
        The paths of the PEM files.
    """
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("stream-scorer throwaway CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALID_FOR)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_pem = ca_cert.public_bytes(pem)
    chain = cert.public_bytes(pem) + ca_pem
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    files = TlsFiles(
        folder / "ca.pem",
        folder / "server.pem",
        folder / "server-cert.pem",
        folder / "server-key.pem",
    )
    _write(files.ca, ca_pem)
    _write(files.server, key_pem + chain, private=True)
    _write(files.server_cert, chain)
    _write(files.server_key, key_pem, private=True)
    return files
