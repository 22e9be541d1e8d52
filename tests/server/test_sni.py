"""Several certificates chosen by the name the TLS client asks for (SNI), on STARTTLS and
implicit TLS: ``[[tls.certificates]]`` in the file, ``--tls-certificate`` on the command
line, ``tls_certificates`` in code."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import trustme

from mailgate import Server
from mailgate.cli import build_parser
from mailgate.config import ConfigError, build_options, options_from_settings
from mailgate.server.tls import CertificateChooser

DEFAULT_NAME, FIRST_NAME, SECOND_NAME = "mx.default.test", "mail.one.test", "two.test"


def write_pair(ca: trustme.CA, directory: Path, label: str, *names: str) -> tuple[Path, Path]:
    leaf = ca.issue_cert(*names)
    cert, key = directory / f"{label}-cert.pem", directory / f"{label}-key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A CA file and a config file with a default certificate and two by name."""
    directory = tmp_path_factory.mktemp("sni")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    write_pair(ca, directory, "default", DEFAULT_NAME)
    write_pair(ca, directory, "one", FIRST_NAME)
    write_pair(ca, directory, "two", SECOND_NAME, "*.two.test")
    config = directory / "mailgate.toml"
    config.write_text(
        "[server]\n"
        'listen = "127.0.0.1:0"\n'
        'smtps_listen = "127.0.0.1:0"\n'
        f'hostname = "{DEFAULT_NAME}"\n'
        "sink = true\n"
        'state_dir = "state"\n'
        'tls_cert = "default-cert.pem"\n'
        'tls_key = "default-key.pem"\n'
        "\n"
        "[[tls.certificates]]\n"
        f'names = ["{FIRST_NAME}"]\n'
        'cert = "one-cert.pem"\n'
        'key = "one-key.pem"\n'
        "\n"
        "[[tls.certificates]]\n"
        f'names = ["{SECOND_NAME}", "*.{SECOND_NAME}"]\n'
        'cert = "two-cert.pem"\n'
        'key = "two-key.pem"\n'
    )
    return directory / "ca.pem", config


def subject_names(certificate: dict[str, object]) -> set[str]:
    return {value for kind, value in certificate["subjectAltName"] if kind == "DNS"}  # type: ignore[attr-defined]


def starttls_names(port: int, ca_file: Path, server_name: str | None) -> set[str]:
    """The DNS names of the certificate the server shows for ``server_name`` (None: no
    SNI; the check of the name is off then, the chain still is checked)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = server_name is not None
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp._host = server_name  # type: ignore[attr-defined]  # smtplib sends it as SNI
        smtp.starttls(context=context)
        assert smtp.noop()[0] == 250
        return subject_names(smtp.sock.getpeercert())  # type: ignore[union-attr]


def smtps_names(port: int, ca_file: Path, server_name: str | None) -> set[str]:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = server_name is not None
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            assert tls.recv(1024).startswith(b"220 ")
            return subject_names(tls.getpeercert())


@pytest.mark.parametrize("connect", [starttls_names, smtps_names], ids=["starttls", "smtps"])
def test_the_certificate_follows_the_name_asked_for(
    pki: tuple[Path, Path], connect: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_file, config = pki
    monkeypatch.chdir(config.parent)
    options = build_options(build_parser().parse_args(["serve", "--config", str(config)]))
    assert [c.names for c in options.tls_certificates] == [
        (FIRST_NAME,),
        (SECOND_NAME, f"*.{SECOND_NAME}"),
    ]
    server = Server(options)

    def talk(plain: int, implicit: int) -> None:
        port = plain if connect is starttls_names else implicit
        names = lambda asked: connect(port, ca_file, asked)  # type: ignore[operator]  # noqa: E731
        assert names(FIRST_NAME) == {FIRST_NAME}
        assert names(SECOND_NAME) == {SECOND_NAME, f"*.{SECOND_NAME}"}
        assert names(f"smtp.{SECOND_NAME}") == {SECOND_NAME, f"*.{SECOND_NAME}"}  # wildcard
        assert names(DEFAULT_NAME) == {DEFAULT_NAME}
        assert names(None) == {DEFAULT_NAME}  # no SNI
        # An unknown name gets the default certificate, which does not name it.
        with pytest.raises(ssl.SSLCertVerificationError):
            names("unknown.test")
        with pytest.raises(ssl.SSLCertVerificationError):
            names(f"a.b.{SECOND_NAME}")  # a wildcard stands for one label only

    async def main() -> None:
        async with server:
            await asyncio.to_thread(talk, server.addresses[0][1], server.addresses[1][1])

    asyncio.run(main())


def test_openssl_s_client_sees_the_certificate_of_its_name(
    pki: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_file, config = pki
    monkeypatch.chdir(config.parent)
    server = Server(build_options(build_parser().parse_args(["serve", "--config", str(config)])))

    def s_client(port: int, name: str) -> str:
        done = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-starttls", "smtp",
             "-servername", name, "-verify_hostname", name, "-CAfile", str(ca_file)],
            input=b"QUIT\r\n", capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        return done.stdout.decode(errors="replace")

    async def main() -> None:
        async with server:
            port = server.address[1]
            # -verify_hostname: "0 (ok)" only when the certificate shown names it.
            for name in (FIRST_NAME, SECOND_NAME, f"x.{SECOND_NAME}", DEFAULT_NAME):
                shown = await asyncio.to_thread(s_client, port, name)
                assert "Verify return code: 0 (ok)" in shown, shown
            shown = await asyncio.to_thread(s_client, port, "unknown.test")
            assert "Verify return code: 62 (hostname mismatch)" in shown, shown

    if not Path("/usr/bin/openssl").exists():
        pytest.skip("openssl is not installed")
    asyncio.run(main())


def test_flag_and_code_spellings(pki: tuple[Path, Path]) -> None:
    _, config = pki
    base = config.parent
    args = build_parser().parse_args(
        ["serve", "--tls-certificate", f"a.test,*.b.test:{base}/one-cert.pem:{base}/one-key.pem"]
    )
    (certificate,) = build_options(args).tls_certificates
    assert certificate.names == ("a.test", "*.b.test")
    assert certificate.cert == base / "one-cert.pem"

    options = options_from_settings(
        {"tls": {"certificates": [
            {"names": "c.test", "cert": str(base / "two-cert.pem"), "key": str(base / "two-key.pem")}
        ]}}
    )  # fmt: skip
    assert options.tls_certificates[0].names == ("c.test",)


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('names = ["a.test"]\ncert = "one-cert.pem"\n', "[[tls.certificates]] #2: key is missing"),
        (
            'names = ["a.test"]\ncert = "one-cert.pem"\nkey = "one-key.pem"\nkeys = 1\n',
            "[[tls.certificates]] #2: unknown key 'keys' (did you mean 'key'?)",
        ),
        (
            'names = ["bad name"]\ncert = "one-cert.pem"\nkey = "one-key.pem"\n',
            "[[tls.certificates]] #2 names: 'bad name' is not a host name",
        ),
        (
            'names = ["a.test"]\ncert = "one-cert.pem"\nkey = "two-key.pem"\n',
            "certificate for a.test: TLS key",
        ),
    ],
)
def test_errors_name_the_file_table_and_key(
    pki: tuple[Path, Path], tmp_path: Path, table: str, error: str
) -> None:
    _, config = pki
    broken = config.parent / f"broken-{abs(hash(table))}.toml"
    broken.write_text(config.read_text().rsplit("[[tls.certificates]]", 1)[0]
                      + "[[tls.certificates]]\n" + table)  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        build_options(build_parser().parse_args(["serve", "--config", str(broken)]))
    assert error in str(caught.value)
    assert str(broken) in str(caught.value) or "certificate for" in str(caught.value)


def test_chooser_prefers_an_exact_name_to_a_wildcard() -> None:
    exact, wildcard = (
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
    )
    chooser = CertificateChooser([(["*.example.test"], wildcard), (["MX.example.test."], exact)])
    assert chooser.choose("mx.EXAMPLE.test") is exact
    assert chooser.choose("other.example.test") is wildcard
    assert chooser.choose("example.test") is None
    assert chooser.choose(None) is None


def test_check_config_shows_and_checks_the_certificates(
    pki: tuple[Path, Path], tmp_path: Path
) -> None:
    import subprocess
    import sys

    _, config = pki

    def check(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mailgate", "check-config", "--config", str(path)],
            cwd=config.parent, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    done = check(config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"two-cert.pem for {SECOND_NAME}, *.{SECOND_NAME}" in done.stdout
    broken = config.parent / "mismatch.toml"
    broken.write_text(config.read_text().replace('key = "two-key.pem"', 'key = "one-key.pem"'))
    done = check(broken)
    assert done.returncode == 2
    assert f"certificate for {SECOND_NAME}, *.{SECOND_NAME}: TLS key" in done.stdout + done.stderr
