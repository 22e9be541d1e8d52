"""create_server_context and the development certificate."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailgate.server import tls
from mailgate.server.tls import TLSConfigError, create_server_context, ensure_dev_certificate


def handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext, name: str) -> str:
    """Run a TLS handshake in memory; the negotiated version."""
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(client_in, client_out, server_hostname=name)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for side, obj in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            version = client.version()
            assert version is not None
            return version
    raise AssertionError("handshake did not finish")


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    issued = ca.issue_cert("mx.example.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


# -- create_server_context ----------------------------------------------------------------


def test_server_context_serves_the_certificate(
    ca: trustme.CA, cert_files: tuple[Path, Path]
) -> None:
    context = create_server_context(*cert_files)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    client = ssl.create_default_context()
    ca.configure_trust(client)
    assert handshake(context, client, "mx.example.test") in {"TLSv1.2", "TLSv1.3"}


def test_combined_pem_file_works(ca: trustme.CA, tmp_path: Path) -> None:
    combined = tmp_path / "both.pem"
    issued = ca.issue_cert("mx.example.test")
    combined.write_bytes(issued.private_key_pem.bytes() + issued.cert_chain_pems[0].bytes())
    create_server_context(combined, combined)


def test_missing_certificate_names_the_file(cert_files: tuple[Path, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSConfigError, match=r"cannot read TLS certificate .*nope\.pem.*No such"):
        create_server_context(missing, cert_files[1])


def test_missing_key_names_the_file(cert_files: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match=r"cannot read TLS key .*nokey\.pem"):
        create_server_context(cert_files[0], tmp_path / "nokey.pem")


def test_garbage_certificate(cert_files: tuple[Path, Path], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TLSConfigError, match="does not contain a PEM certificate"):
        create_server_context(garbage, cert_files[1])


def test_key_given_as_certificate(cert_files: tuple[Path, Path]) -> None:
    cert, key = cert_files
    with pytest.raises(TLSConfigError, match="does not contain a PEM certificate"):
        create_server_context(key, key)
    with pytest.raises(TLSConfigError, match="does not contain a PEM private key"):
        create_server_context(cert, cert)


def test_key_of_another_certificate(
    ca: trustme.CA, cert_files: tuple[Path, Path], tmp_path: Path
) -> None:
    other = tmp_path / "other-key.pem"
    ca.issue_cert("other.test").private_key_pem.write_to_path(str(other))
    with pytest.raises(TLSConfigError, match="does not belong to certificate"):
        create_server_context(cert_files[0], other)


def test_encrypted_key_is_refused_without_prompting(
    cert_files: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = cert_files
    private_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match="is encrypted"):
        create_server_context(cert, encrypted)


def test_tls_config_error_is_a_value_error() -> None:
    assert issubclass(TLSConfigError, ValueError)


# -- ensure_dev_certificate ---------------------------------------------------------------


def test_dev_certificate_is_created_with_private_key_mode(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cert, key = ensure_dev_certificate(state, "mx.example.test")
    assert cert.parent == state and key.parent == state
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not [p for p in state.iterdir() if p.name.endswith(".tmp")]

    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"mx.example.test", "localhost"}
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }


@pytest.mark.parametrize("name", ["mx.example.test", "localhost", "127.0.0.1", "::1"])
def test_dev_certificate_verifies_for_each_name(tmp_path: Path, name: str) -> None:
    cert, key = ensure_dev_certificate(tmp_path, "mx.example.test")
    client = ssl.create_default_context(cafile=str(cert))
    assert handshake(create_server_context(cert, key), client, name)


def test_dev_certificate_is_reused(tmp_path: Path) -> None:
    cert, key = ensure_dev_certificate(tmp_path, "mx.example.test")
    first = (cert.read_bytes(), key.read_bytes(), cert.stat().st_mtime_ns)
    again = ensure_dev_certificate(tmp_path, "mx.example.test")
    assert again == (cert, key)
    assert (cert.read_bytes(), key.read_bytes(), cert.stat().st_mtime_ns) == first


def test_dev_certificate_is_remade_for_another_hostname(tmp_path: Path) -> None:
    cert, _ = ensure_dev_certificate(tmp_path, "one.example.test")
    before = cert.read_bytes()
    cert, key = ensure_dev_certificate(tmp_path, "two.example.test")
    assert cert.read_bytes() != before
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "two.example.test" in names.get_values_for_type(x509.DNSName)
    create_server_context(cert, key)


def test_damaged_dev_certificate_is_remade(tmp_path: Path) -> None:
    cert, key = ensure_dev_certificate(tmp_path, "mx.example.test")
    key.write_text("damaged")
    cert, key = ensure_dev_certificate(tmp_path, "mx.example.test")
    create_server_context(cert, key)


def test_dev_certificate_close_to_expiry_is_remade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datetime as dt

    monkeypatch.setattr(tls, "_DEV_VALIDITY", dt.timedelta(days=10))
    cert, _ = ensure_dev_certificate(tmp_path, "mx.example.test")
    before = cert.read_bytes()
    monkeypatch.undo()
    cert, _ = ensure_dev_certificate(tmp_path, "mx.example.test")
    assert cert.read_bytes() != before


def test_dev_certificate_for_an_ip_hostname(tmp_path: Path) -> None:
    cert, key = ensure_dev_certificate(tmp_path, "192.0.2.7")
    client = ssl.create_default_context(cafile=str(cert))
    assert handshake(create_server_context(cert, key), client, "192.0.2.7")


def test_concurrent_starts_agree_on_one_pair(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: ensure_dev_certificate(tmp_path, "mx.test"), range(4)))
    assert len(set(results)) == 1
    create_server_context(*results[0])


def test_unwritable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TLSConfigError, match="cannot create development TLS certificate in"):
        ensure_dev_certificate(blocker / "state", "mx.example.test")
