"""Whether a server's certificate would have verified, found after the handshake.

Opportunistic TLS (RFC 7435) must not refuse a certificate that does not verify, yet the
log and the DSN should say whether it did (Postfix's "Trusted"/"Untrusted"). The stdlib
cannot verify without failing the handshake, so the chain the server sent is checked
afterwards with ``cryptography``'s X.509 verifier against the configured or system CAs,
for the name the connection was meant for (the MX host or smarthost name).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import ssl
import warnings
from typing import Any

from cryptography import x509
from cryptography.x509 import DNSName, IPAddress
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store

log = logging.getLogger("mailgate.queue.outbound")

_DER = 2  # _ssl.ENCODING_DER


_stores: dict[str | None, Store | None] = {}


async def trust_store_for(cafile: str | None) -> Store | None:
    """:func:`trust_store`, read in a worker thread the first time, then from memory."""
    if cafile in _stores:
        return _stores[cafile]
    store = await asyncio.get_running_loop().run_in_executor(None, trust_store, cafile)
    _stores[cafile] = store
    return store


def trust_store(cafile: str | None) -> Store | None:
    """The CAs of ``cafile`` (PEM), or the system's; None when none can be read.
    Blocking (reads files): call it from a worker thread the first time."""
    certificates: list[x509.Certificate] = []
    if cafile is not None:
        paths = [cafile]
    else:
        defaults = ssl.get_default_verify_paths()
        paths = [p for p in (defaults.cafile, defaults.openssl_cafile) if p]
        if (
            defaults.capath
            and os.path.isdir(defaults.capath)
            and not any(os.path.isfile(p) for p in paths)
        ):
            paths += [
                os.path.join(defaults.capath, name)
                for name in sorted(os.listdir(defaults.capath))
                if name.endswith((".pem", ".crt", ".0"))
            ]
    for path in dict.fromkeys(paths):
        try:
            with open(path, "rb") as file, warnings.catch_warnings():
                # System bundles hold a few old roots that RFC 5280 parsers frown upon.
                warnings.simplefilter("ignore")
                certificates += x509.load_pem_x509_certificates(file.read())
        except (OSError, ValueError):
            continue
        if cafile is None and certificates:
            break  # the first readable system bundle is the system's store
    if not certificates:
        log.warning("no CA certificates to check server certificates with (%s)", cafile)
        return None
    return Store(certificates)


def peer_chain(ssl_object: Any) -> list[bytes]:
    """The certificates the server sent (DER), leaf first."""
    getter = getattr(ssl_object, "get_unverified_chain", None)  # Python >= 3.13
    if getter is None:  # 3.10-3.12 have it on the C object only
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        try:
            chain = getter() or []
        except (ssl.SSLError, ValueError):
            chain = []
        out = [c if isinstance(c, bytes) else c.public_bytes(_DER) for c in chain]
        if out:
            return out
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def chain_verifies(chain: list[bytes], host: str, store: Store | None) -> bool:
    """True when ``chain`` leads to a CA of ``store`` and its leaf names ``host``."""
    return chain_problem(chain, host, store) is None


def chain_problem(chain: list[bytes], host: str, store: Store | None) -> str | None:
    """Why ``chain`` does not verify for ``host`` against ``store`` (one line), or None
    when it does (a trusted CA, in its validity period, naming ``host``)."""
    if not chain:
        return "the server sent no certificate"
    if store is None:
        return "no CA certificates to check it with"
    try:
        leaf = x509.load_der_x509_certificate(chain[0])
        intermediates = [x509.load_der_x509_certificate(der) for der in chain[1:]]
    except ValueError as exc:
        return f"unreadable certificate: {exc}"
    subject: DNSName | IPAddress
    try:
        subject = IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = DNSName(host.lower().rstrip("."))
    try:
        verifier = (
            PolicyBuilder()
            .store(store)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_leaf_policy())
            .build_server_verifier(subject)
        )
        verifier.verify(leaf, intermediates)
    except Exception as exc:  # any verification problem: simply not verified, and why
        return f"certificate not verified for {host}: {_reason(exc)}"
    return None


def _reason(exc: Exception) -> str:
    """cryptography's account of a failed verification, shortened for a log line."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = text.removeprefix("validation failed: ").split(" (encountered processing")[0]
    if "candidates exhausted" in text:
        return "no chain to a trusted CA"
    if "not valid at validation time" in text:
        return "expired or not yet valid"
    return text[:200]


_CA_POLICY = ExtensionPolicy.webpki_defaults_ca()


@functools.cache
def _leaf_policy() -> ExtensionPolicy:
    """The Web PKI rules for the server's certificate, except the criticality of
    subjectAltName and extendedKeyUsage, which OpenSSL (what Postfix and the stdlib
    verify with) does not care about and which private CAs often set."""
    return (
        ExtensionPolicy.webpki_defaults_ee()
        .require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _for_servers)
    )


def _for_servers(policy: Any, certificate: x509.Certificate, usage: Any) -> None:
    if usage is None:
        return
    if (
        ExtendedKeyUsageOID.SERVER_AUTH not in usage
        and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usage
    ):
        raise ValueError("the certificate is not for TLS servers")
