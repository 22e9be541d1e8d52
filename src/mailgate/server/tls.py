"""TLS contexts for the listeners, and a self-signed certificate for development.

``create_server_context`` checks the certificate and key itself before handing them to
OpenSSL, because OpenSSL's own errors ("PEM lib") do not say which file is wrong or why.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEV_CERT_NAME = "dev-cert.pem"
DEV_KEY_NAME = "dev-key.pem"
_LOCK_NAME = "dev-tls.lock"
_DEV_VALIDITY = dt.timedelta(days=365)
# Renew a little before expiry so a long-running server does not cross the date.
_DEV_RENEW_BEFORE = dt.timedelta(days=30)


class TLSConfigError(ValueError):
    """A certificate or key cannot be used; the message names the file and the reason."""


def create_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side context for ``cert`` (PEM, leaf first, chain may follow) and ``key``.

    TLS 1.2 is the minimum: older versions are disabled by current OpenSSL builds anyway
    and RFC 8996 deprecates them. Client certificates are not requested.
    """
    cert_pem = _read(cert, "TLS certificate")
    key_pem = _read(key, "TLS key")
    _check_certificate(cert, cert_pem)
    _check_private_key(key, key_pem)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Compression enables CRIME-style attacks; renegotiation lets a client make the
    # server redo expensive handshakes on one connection.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        # A password callback that refuses keeps OpenSSL from prompting on the terminal.
        context.load_cert_chain(cert, key, password=_refuse_password)
    except _EncryptedKey:
        raise TLSConfigError(
            f"TLS key {key} is encrypted; mailgate needs an unencrypted key"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(f"TLS key {key} does not belong to certificate {cert}") from None
        raise TLSConfigError(
            f"cannot use TLS certificate {cert} with key {key}: {exc.reason or exc}"
        ) from None
    except OSError as exc:  # the files changed between the checks and the load
        raise TLSConfigError(f"cannot read TLS certificate or key: {exc}") from None
    context.sni_callback = _remember_server_name
    return context


#: Where the SNI callback leaves the name the client asked for, on the SSL object.
SERVER_NAME_ATTRIBUTE = "mailgate_server_name"


def _remember_server_name(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _context: ssl.SSLContext
) -> None:
    # The handshake goes on with this context; the name is only recorded for the session.
    setattr(ssl_object, SERVER_NAME_ATTRIBUTE, server_name)


class CertificateChooser:
    """The SNI callback of a server context that has more certificates than its own:
    the context whose names hold the name the client asked for (an exact name before a
    wildcard ``*.example.com``, which stands for one label); the server context's own
    certificate otherwise (an unknown name, or no name at all). The asked name is
    recorded on the connection as without a chooser."""

    def __init__(self, contexts: Sequence[tuple[Sequence[str], ssl.SSLContext]]) -> None:
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}
        for names, context in contexts:
            for name in names:
                name = name.lower().rstrip(".")
                if name.startswith("*."):
                    self.wildcard.setdefault(name[2:], context)
                else:
                    self.exact.setdefault(name, context)

    def choose(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context for ``server_name``; None: the server context's own."""
        if not server_name:
            return None
        name = server_name.lower().rstrip(".")
        chosen = self.exact.get(name)
        if chosen is None and "." in name:
            chosen = self.wildcard.get(name.split(".", 1)[1])
        return chosen

    def __call__(
        self,
        ssl_object: ssl.SSLObject | ssl.SSLSocket,
        server_name: str | None,
        _context: ssl.SSLContext,
    ) -> None:
        _remember_server_name(ssl_object, server_name, _context)
        chosen = self.choose(server_name)
        if chosen is not None:
            ssl_object.context = chosen


def add_certificates(
    context: ssl.SSLContext, certificates: Sequence[tuple[Sequence[str], Path, Path]]
) -> None:
    """Give ``context`` more certificates, each for the clients that ask for one of its
    names (SNI): ``(names, cert, key)``. Each pair is checked as
    :func:`create_server_context` checks the server's own (TLSConfigError naming it)."""
    if certificates:
        context.sni_callback = CertificateChooser(
            [(names, create_server_context(cert, key)) for names, cert, key in certificates]
        )


def ensure_dev_certificate(state_dir: Path, hostname: str) -> tuple[Path, Path]:
    """Generate once (reuse on later starts) a self-signed cert+key for hostname.

    The certificate names ``hostname``, ``localhost``, ``127.0.0.1`` and ``::1``. It lives in
    ``state_dir`` as ``dev-cert.pem`` and ``dev-key.pem`` (mode 0600) and is made again when
    it is missing, unreadable, does not name ``hostname`` or is within 30 days of expiry.
    A lock file serialises processes that start at the same time, so a key never ends up
    next to another process's certificate. Returns ``(cert_path, key_path)``.
    Raises TLSConfigError when the state directory cannot be written.
    """
    cert_path = state_dir / DEV_CERT_NAME
    key_path = state_dir / DEV_KEY_NAME
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _locked(state_dir / _LOCK_NAME):
            if not _dev_certificate_usable(cert_path, key_path, hostname):
                cert_pem, key_pem = _make_self_signed(hostname)
                _write_atomic(key_path, key_pem, 0o600)
                _write_atomic(cert_path, cert_pem, 0o644)
    except OSError as exc:
        raise TLSConfigError(
            f"cannot create development TLS certificate in {state_dir}: {exc.strerror or exc}"
        ) from None
    return cert_path, key_path


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> bytes:
    raise _EncryptedKey


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _check_certificate(path: Path, pem: bytes) -> None:
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise TLSConfigError(
            f"TLS certificate {path} does not contain a PEM certificate "
            "(-----BEGIN CERTIFICATE-----)"
        ) from None


def _check_private_key(path: Path, pem: bytes) -> None:
    try:
        serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # cryptography's way of saying "a password is needed"
        raise TLSConfigError(
            f"TLS key {path} is encrypted; mailgate needs an unencrypted key"
        ) from None
    except UnsupportedAlgorithm:
        raise TLSConfigError(f"TLS key {path} uses an unsupported key type") from None
    except ValueError:
        raise TLSConfigError(
            f"TLS key {path} does not contain a PEM private key (-----BEGIN ... PRIVATE KEY-----)"
        ) from None


def _dev_certificate_usable(cert_path: Path, key_path: Path, hostname: str) -> bool:
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        create_server_context(cert_path, key_path)  # proves the key is there and matches
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    now = dt.datetime.now(dt.UTC)
    if certificate.not_valid_after_utc - _DEV_RENEW_BEFORE < now:
        return False
    wanted = _san_entry(hostname)
    return wanted in list(names)


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(_ascii_name(name))


def _ascii_name(name: str) -> str:
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name.encode("ascii", "replace").decode("ascii")


def _make_self_signed(hostname: str) -> tuple[bytes, bytes]:
    # P-256 generates instantly, unlike RSA, and every current TLS client accepts it.
    key = ec.generate_private_key(ec.SECP256R1())
    entries: list[x509.GeneralName] = []
    for name in (hostname, "localhost", "127.0.0.1", "::1"):
        entry = _san_entry(name)
        if entry not in entries:
            entries.append(entry)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mailgate development certificate"),
            x509.NameAttribute(NameOID.COMMON_NAME, _ascii_name(hostname)[:64] or "localhost"),
        ]
    )
    # Backdated a day so clients whose clocks run slow still accept it.
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + _DEV_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(entries), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # The key must never exist, even briefly, with wider permissions than ``mode``:
    # create the temporary file with it rather than chmod afterwards.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no concurrent workers to guard against
        yield
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
