"""DKIM keys: made by ``mailgate dkim keygen``, read by the signer, published in DNS.

A key file is what ``mailgate dkim keygen`` writes, or what other tools write:

* RSA (``rsa-sha256``): a PEM private key, PKCS#1 (``BEGIN RSA PRIVATE KEY``, what
  opendkim-genkey and ``openssl genrsa`` write) or PKCS#8 (``BEGIN PRIVATE KEY``), at
  least 1024 bits (RFC 8301 3.2; 2048 is what keygen makes);
* Ed25519 (``ed25519-sha256``, RFC 8463): a PKCS#8 PEM key (``openssl genpkey -algorithm
  ed25519``, and what keygen writes), or the base64 of the 32-byte seed alone (what
  dkimpy's ``dknewkey`` writes).

:func:`load_signing_key` reads one into what dkimpy signs with; :func:`txt_record` is the
record that publishes its public half at ``<selector>._domainkey.<domain>``. Keys are
handled with ``cryptography`` (a dependency already); dkimpy only signs.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

__all__ = [
    "ALGORITHMS",
    "DEFAULT_RSA_BITS",
    "MIN_RSA_BITS",
    "Algorithm",
    "KeyFileError",
    "SigningKey",
    "generate_key",
    "load_signing_key",
    "record_name",
    "txt_record",
    "write_key_file",
    "zone_line",
]

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
#: The signing algorithms, the default first.
ALGORITHMS: Final[tuple[Algorithm, ...]] = ("rsa-sha256", "ed25519-sha256")
#: RFC 8301 3.2: signers MUST use at least 1024 bits and SHOULD use 2048.
MIN_RSA_BITS: Final = 1024
DEFAULT_RSA_BITS: Final = 2048
#: Longest character-string of a TXT record (RFC 1035 3.3); longer values are split.
_TXT_STRING: Final = 255

_PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class KeyFileError(ValueError):
    """A key file that cannot be used; the message says why (without the path)."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key ready for dkimpy, with its public record."""

    algorithm: Algorithm
    #: What dkimpy's ``sign(privkey=...)`` takes: PKCS#1 PEM for RSA, the base64 seed
    #: for Ed25519.
    dkimpy_key: bytes = b""
    #: The TXT record value that publishes the public key (``v=DKIM1; k=...; p=...``).
    record: str = ""
    #: RSA modulus size (0 for Ed25519).
    bits: int = 0
    #: The RSA key itself, which signs through OpenSSL (see mailgate.queue.signing).
    rsa_key: rsa.RSAPrivateKey | None = None

    def describe(self) -> str:
        return f"{self.algorithm}, {self.bits} bits" if self.bits else self.algorithm


def generate_key(algorithm: Algorithm, bits: int = DEFAULT_RSA_BITS) -> _PrivateKey:
    """A new private key for ``algorithm`` (``bits`` for RSA only)."""
    if algorithm == "ed25519-sha256":
        return ed25519.Ed25519PrivateKey.generate()
    if bits < MIN_RSA_BITS:
        raise KeyFileError(f"an RSA key needs at least {MIN_RSA_BITS} bits (RFC 8301)")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def key_file_bytes(key: _PrivateKey) -> bytes:
    """How keygen writes a key: PKCS#1 PEM for RSA (what opendkim and dkimpy read too),
    PKCS#8 PEM for Ed25519 (what openssl writes)."""
    if isinstance(key, rsa.RSAPrivateKey):
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_key_file(path: Path, key: _PrivateKey, *, overwrite: bool = False) -> None:
    """Write ``key`` to ``path``, readable by its owner only (0600). An existing file is
    kept unless ``overwrite``: its public half may be in DNS already."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    descriptor = os.open(path, flags, 0o600)
    try:
        # The mode of an existing file, or one a umask widened, is set explicitly.
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, key_file_bytes(key))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def txt_record(key: _PrivateKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey) -> str:
    """The DKIM key record (RFC 6376 3.6.1) publishing the public half of ``key``: for
    RSA the DER SubjectPublicKeyInfo, for Ed25519 the raw 32 bytes (RFC 8463 4.2)."""
    public = key.public_key() if isinstance(key, _PrivateKey) else key
    if isinstance(public, rsa.RSAPublicKey):
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"


def record_name(selector: str, domain: str) -> str:
    """Where a selector's key record lives (RFC 6376 3.6.2.1)."""
    return f"{selector}._domainkey.{domain.rstrip('.')}"


def zone_line(selector: str, domain: str, record: str, ttl: int = 3600) -> str:
    """The record as a zone-file line, the value split into strings of at most 255
    characters (a 2048-bit RSA key does not fit in one)."""
    strings = [record[i : i + _TXT_STRING] for i in range(0, len(record), _TXT_STRING)]
    quoted = " ".join(f'"{part}"' for part in strings)
    return f"{record_name(selector, domain)}. {ttl} IN TXT {quoted}"


def load_signing_key(path: Path, algorithm: Algorithm) -> SigningKey:
    """Read the key file at ``path`` for ``algorithm``. Raises OSError when it cannot be
    read and :class:`KeyFileError` when it is not a usable key of that algorithm."""
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        key = _pem_key(data)
    elif algorithm == "ed25519-sha256":
        key = _seed_key(data)
    else:
        raise KeyFileError("not a PEM private key (-----BEGIN RSA PRIVATE KEY-----)")
    if algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise KeyFileError("an Ed25519 key, but the algorithm is rsa-sha256")
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(
                f"a {key.key_size}-bit RSA key; DKIM needs at least {MIN_RSA_BITS} (RFC 8301)"
            )
        pkcs1 = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return SigningKey(algorithm, pkcs1, txt_record(key), key.key_size, key)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError("an RSA key, but the algorithm is ed25519-sha256")
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return SigningKey(algorithm, base64.b64encode(seed), txt_record(key))


def _pem_key(data: bytes) -> _PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError("the key is encrypted with a passphrase; store it unencrypted") from None
    except (ValueError, binascii.Error) as exc:
        raise KeyFileError(f"not a private key ({exc})") from None
    if not isinstance(key, _PrivateKey):
        raise KeyFileError(f"a {type(key).__name__}; DKIM signs with RSA or Ed25519 keys")
    return key


def _seed_key(data: bytes) -> ed25519.Ed25519PrivateKey:
    """dknewkey's Ed25519 format: the base64 of the 32-byte private seed."""
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except binascii.Error:
        seed = b""
    if len(seed) != 32:
        raise KeyFileError("not an Ed25519 key (PEM, or the base64 of a 32-byte seed)")
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
