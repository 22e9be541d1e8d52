"""Receivers with every kind of certificate, for the TLS policy tests.

Each kind of MX listens on its own 127.0.0.x (56-60) for the test's domain: a valid
certificate of the test CA, one for another name, an expired one, a self-signed one,
and a server that offers no STARTTLS at all.
"""

from __future__ import annotations

import contextlib
import datetime
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tests.dns_server import DNSTestServer
from tests.outbound.helpers import new_domain, publish_mx
from tests.outbound.receivers import Certs, Receiver

#: Receiver kind -> its address.
ADDRESSES = {
    "valid": "127.0.0.56",
    "wrong-name": "127.0.0.57",
    "expired": "127.0.0.58",
    "self-signed": "127.0.0.59",
    "no-starttls": "127.0.0.60",
}


def expired_context(certs: Certs, name: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    utc = datetime.UTC
    certs.ca.issue_cert(
        name,
        not_before=datetime.datetime(2020, 1, 1, tzinfo=utc),
        not_after=datetime.datetime(2021, 1, 1, tzinfo=utc),
    ).configure_cert(context)
    return context


def self_signed_context(tmp_path: Path, name: str) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "self-signed.pem", tmp_path / "self-signed.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


@dataclass
class Zoo:
    """One domain per kind of receiver (its MX ``mx.<domain>`` on the kind's address)."""

    domains: dict[str, str]
    receivers: dict[str, Receiver]

    def kind_of(self, domain: str) -> str:
        return next(kind for kind, d in self.domains.items() if d == domain)


def publish_zoo(dns: DNSTestServer, prefix: str) -> dict[str, str]:
    domains = {}
    for kind, address in ADDRESSES.items():
        domain = new_domain(f"{prefix}{kind.replace('-', '')}")
        publish_mx(dns, domain, (10, "mx", address))
        domains[kind] = domain
    return domains


@contextlib.contextmanager
def zoo(tmp_path: Path, certs: Certs, port: int, domains: dict[str, str]) -> Iterator[Zoo]:
    """The five receivers, each with the certificate its kind says for its domain."""
    contexts: dict[str, ssl.SSLContext | None] = {
        "valid": certs.server_context(f"mx.{domains['valid']}"),
        "wrong-name": certs.server_context("somebody-else.test"),
        "expired": expired_context(certs, f"mx.{domains['expired']}"),
        "self-signed": self_signed_context(tmp_path, f"mx.{domains['self-signed']}"),
        "no-starttls": None,
    }
    with contextlib.ExitStack() as stack:
        receivers = {
            kind: stack.enter_context(Receiver(ADDRESSES[kind], port, tls_context=contexts[kind]))
            for kind in ADDRESSES
        }
        yield Zoo(domains, receivers)
