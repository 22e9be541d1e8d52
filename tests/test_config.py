"""mailgate.config: flags and TOML file into ServerOptions."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest
import trustme

from mailgate import config
from mailgate.cli import build_parser
from mailgate.config import KEYS, ConfigError, build_options, flag_name, parse_listen_address
from mailgate.protocol.config import BareNewline
from mailgate.server.options import ListenAddress, ServerOptions

FQDN = "fqdn.example.test"


@pytest.fixture(autouse=True)
def fixed_fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real lookup may query DNS; it has its own test below.
    monkeypatch.setattr(config, "machine_fqdn", lambda: FQDN)


@pytest.fixture
def cert_files(tmp_path: Path) -> tuple[Path, Path]:
    issued = trustme.CA().issue_cert("mx.example.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


def build(*argv: str) -> ServerOptions:
    return build_options(build_parser().parse_args(["serve", *argv]))


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "mailgate.toml"
    path.write_text(body)
    return path


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def test_no_flags_gives_the_defaults() -> None:
    assert build() == ServerOptions(hostname=FQDN)


def test_every_flag(cert_files: tuple[Path, Path]) -> None:
    cert, key = cert_files
    options = build(
        "--listen", "0.0.0.0:25",
        "--listen", "[::]:25",
        "--smtps-listen", "0.0.0.0:465",
        "--hostname", "mx.example.test",
        "--mbox", "mail.mbox",
        "--state-dir", "/var/lib/mailgate",
        "--tls-cert", str(cert),
        "--tls-key", str(key),
        "--auth-user", "alice:s3cret:with:colons",
        "--auth-user", "bob:pw",
        "--allow-insecure-auth",
        "--max-size", "1000",
        "--max-recipients", "5",
        "--max-clients", "50",
        "--max-clients-per-ip", "3",
        "--idle-timeout", "12.5",
        "--data-timeout", "60",
        "--close-timeout", "2",
        "--lmtp",
        "--proxy-protocol", "10.0.0.0/8,192.168.1.0/24",
        "--proxy-protocol", "2001:db8::/32",
        "--trusted-networks", "127.0.0.1",
        "--workers", "4",
        "--no-received-header",
        "--bare-newline", "normalize",
        "--log-format", "json",
        "--verbose",
    )  # fmt: skip
    assert options == ServerOptions(
        listen=(
            ListenAddress("0.0.0.0", 25),
            ListenAddress("::", 25),
            ListenAddress("0.0.0.0", 465, implicit_tls=True),
        ),
        hostname="mx.example.test",
        delivery="mbox",
        mbox=Path("mail.mbox"),
        state_dir=Path("/var/lib/mailgate"),
        tls_cert=cert,
        tls_key=key,
        auth_users=(("alice", "s3cret:with:colons"), ("bob", "pw")),
        allow_insecure_auth=True,
        max_size=1000,
        max_recipients=5,
        max_clients=50,
        max_clients_per_ip=3,
        idle_timeout=12.5,
        data_timeout=60.0,
        close_timeout=2.0,
        lmtp=True,
        proxy_protocol=(net("10.0.0.0/8"), net("192.168.1.0/24"), net("2001:db8::/32")),
        trusted_networks=(net("127.0.0.1/32"),),
        workers=4,
        received_header=False,
        bare_newline=BareNewline.NORMALIZE,
        log_format="json",
        log_level="DEBUG",
    )


def test_every_key_in_a_file(tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    cert, key = cert_files
    path = write_config(
        tmp_path,
        f"""
        [server]
        listen = ["0.0.0.0:25", "[::]:25"]
        smtps_listen = "0.0.0.0:465"
        hostname = "mx.example.test"
        mbox = "mail.mbox"
        state_dir = "/var/lib/mailgate"
        tls_cert = "{cert.name}"
        tls_key = "{key}"
        auth_users = ["alice:s3cret", "bob:pw"]
        allow_insecure_auth = true
        max_size = "1K"
        max_recipients = 5
        max_clients = 50
        max_clients_per_ip = 3
        idle_timeout = 12.5
        data_timeout = 60
        close_timeout = 2
        lmtp = true
        proxy_protocol = ["10.0.0.0/8", "192.168.1.0/24,2001:db8::/32"]
        trusted_networks = "127.0.0.1"
        workers = 4
        no_received_header = true
        bare_newline = "strict"
        log_format = "json"
        quiet = true
        """,
    )
    options = build("--config", str(path))
    assert options == ServerOptions(
        listen=(
            ListenAddress("0.0.0.0", 25),
            ListenAddress("::", 25),
            ListenAddress("0.0.0.0", 465, implicit_tls=True),
        ),
        hostname="mx.example.test",
        delivery="mbox",
        mbox=tmp_path / "mail.mbox",
        state_dir=Path("/var/lib/mailgate"),
        tls_cert=tmp_path / cert.name,
        tls_key=key,
        auth_users=(("alice", "s3cret"), ("bob", "pw")),
        allow_insecure_auth=True,
        max_size=1024,
        max_recipients=5,
        max_clients=50,
        max_clients_per_ip=3,
        idle_timeout=12.5,
        data_timeout=60.0,
        close_timeout=2.0,
        lmtp=True,
        proxy_protocol=(net("10.0.0.0/8"), net("192.168.1.0/24"), net("2001:db8::/32")),
        trusted_networks=(net("127.0.0.1/32"),),
        workers=4,
        received_header=False,
        bare_newline=BareNewline.STRICT,
        log_format="json",
        log_level="WARNING",
    )


def test_every_key_is_a_flag_destination() -> None:
    # build_options reads flags by key name; a key without a flag would be silently unset.
    namespace = build_parser().parse_args(["serve"])
    assert set(KEYS) <= set(vars(namespace))
    assert flag_name("max_clients_per_ip") == "--max-clients-per-ip"
    assert flag_name("auth_users") == "--auth-user"


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert build("--config", str(write_config(tmp_path, ""))) == ServerOptions(hostname=FQDN)


# -- precedence -----------------------------------------------------------------------------


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        [server]
        max_size = 1000
        listen = ["127.0.0.1:25", "127.0.0.1:26"]
        smtps_listen = ["127.0.0.1:465"]
        hostname = "file.example.test"
        lmtp = true
        """,
    )
    options = build(
        "--config", str(path), "--max-size", "2000", "--listen", "127.0.0.1:2525",
        "--hostname", "flag.example.test",
    )  # fmt: skip
    assert options.max_size == 2000
    assert options.hostname == "flag.example.test"
    # Lists are replaced, not merged; the file's other list stays.
    assert options.listen == (
        ListenAddress("127.0.0.1", 2525),
        ListenAddress("127.0.0.1", 465, implicit_tls=True),
    )
    assert options.lmtp is True  # not given as a flag: the file's value


@pytest.mark.parametrize(
    ("file_line", "flag", "expected"),
    [
        ('mbox = "x.mbox"', "--sink", "sink"),
        ("sink = true", "--maildir=md", "maildir"),
        ('maildir = "md"', "--mbox=x.mbox", "mbox"),
    ],
)
def test_a_delivery_flag_replaces_the_files_delivery(
    tmp_path: Path, file_line: str, flag: str, expected: str
) -> None:
    path = write_config(tmp_path, f"[server]\n{file_line}\n")
    assert build("--config", str(path), flag).delivery == expected


def test_a_verbosity_flag_replaces_the_files(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[server]\nquiet = true\n")
    assert build("--config", str(path)).log_level == "WARNING"
    assert build("--config", str(path), "-v").log_level == "DEBUG"
    assert build("--config", str(path), "-q").log_level == "WARNING"


def test_relative_paths_in_the_file_follow_the_file(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    path = write_config(sub, '[server]\nmaildir = "mail"\nstate_dir = "~/state"\n')
    options = build("--config", str(path))
    assert options.maildir == sub / "mail"
    assert options.state_dir == Path.home() / "state"


def test_relative_paths_as_flags_stay_relative() -> None:
    options = build("--maildir", "mail", "--state-dir", "st")
    assert options.maildir == Path("mail")
    assert options.state_dir == Path("st")


# -- individual values ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:25", "127.0.0.1", 25),
        ("0.0.0.0:65535", "0.0.0.0", 65535),
        ("[::1]:2525", "::1", 2525),
        ("[2001:DB8:0::1]:1", "2001:db8::1", 1),
        ("127.0.0.1:0", "127.0.0.1", 0),  # the system picks a free port
        ("localhost:25", "localhost", 25),
        ("mx.example.test:587", "mx.example.test", 587),
        (" 127.0.0.1:25 ", "127.0.0.1", 25),
    ],
)
def test_listen_address(text: str, host: str, port: int) -> None:
    assert parse_listen_address(text) == ListenAddress(host, port)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("bad", "is not HOST:PORT"),
        ("127.0.0.1", "is not HOST:PORT"),
        ("127.0.0.1:65536", "out of range"),
        ("127.0.0.1:-1", "no valid port"),
        ("127.0.0.1:smtp", "no valid port"),
        ("127.0.0.1:", "no valid port"),
        ("::1:25", "brackets"),
        ("[::1]25", r"is not \[IPv6\]:PORT"),
        ("[::1:25", r"is not \[IPv6\]:PORT"),
        ("[1.2.3.4]:25", "is not an IPv6 address"),
        (":25", "has no host"),
        ("1.2.3.256:25", "neither an IP address nor a host name"),
        ("bad host:25", "neither an IP address nor a host name"),
        ("-x.example:25", "neither an IP address nor a host name"),
    ],
)
def test_bad_listen_address(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        build(f"--listen={text}")


def test_smtps_listen_alone_means_no_plain_listener() -> None:
    options = build("--smtps-listen", "127.0.0.1:465")
    assert options.listen == (ListenAddress("127.0.0.1", 465, implicit_tls=True),)


def test_the_same_address_twice_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1:25 is already given \(in --listen\)"):
        build("--listen", "127.0.0.1:25", "--smtps-listen", "127.0.0.1:25")


def test_nothing_to_listen_on(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[server]\nlisten = []\nsmtps_listen = []\n")
    with pytest.raises(ConfigError, match="no address to listen on"):
        build("--config", str(path))


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("1000", 1000),
        ("25M", 25 * 1024 * 1024),
        ("25m", 25 * 1024 * 1024),
        ("25MiB", 25 * 1024 * 1024),
        ("25MB", 25_000_000),
        ("1K", 1024),
        ("1 KiB", 1024),
        ("2G", 2 * 1024**3),
        ("3GB", 3 * 1000**3),
        ("10B", 10),
    ],
)
def test_size_suffixes(text: str, size: int) -> None:
    assert build("--max-size", text).max_size == size


@pytest.mark.parametrize(
    ("value", "expected"),
    [("10.0.0.0/8", "10.0.0.0/8"), ("192.0.2.1", "192.0.2.1/32"), ("::1", "::1/128")],
)
def test_networks(value: str, expected: str) -> None:
    assert build("--trusted-networks", value).trusted_networks == (net(expected),)


def test_empty_network_list_in_file_disables(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[server]\nproxy_protocol = ""\ntrusted_networks = []\n')
    options = build("--config", str(path))
    assert options.proxy_protocol == () and options.trusted_networks == ()


def test_choices_are_case_insensitive_in_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[server]\nbare_newline = "Normalize"\nlog_format = "JSON"\n')
    options = build("--config", str(path))
    assert options.bare_newline is BareNewline.NORMALIZE
    assert options.log_format == "json"


def test_false_switches_in_the_file(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, '[server]\nsink = false\nmaildir = "m"\nverbose = false\nlmtp = false\n'
    )
    options = build("--config", str(path))
    assert options.delivery == "maildir"
    assert options.log_level == "INFO"
    assert options.lmtp is False


def test_hostname_is_looked_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real machine_fqdn, with a counting getfqdn underneath
    calls: list[None] = []

    def getfqdn() -> str:
        calls.append(None)
        return "looked-up.example.test"

    config.machine_fqdn.cache_clear()
    monkeypatch.setattr(socket, "getfqdn", getfqdn)
    try:
        assert build().hostname == "looked-up.example.test"
        assert build().hostname == "looked-up.example.test"
        assert build("--hostname", "given.example.test").hostname == "given.example.test"
        assert len(calls) == 1
    finally:
        config.machine_fqdn.cache_clear()


def test_hostname_flag_skips_the_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> str:
        raise AssertionError("looked up")

    monkeypatch.setattr(config, "machine_fqdn", fail)
    assert build("--hostname", "mx.example.test").hostname == "mx.example.test"


def test_tls_certificate_and_key_are_kept(cert_files: tuple[Path, Path]) -> None:
    cert, key = cert_files
    options = build("--tls-cert", str(cert), "--tls-key", str(key))
    assert (options.tls_cert, options.tls_key) == (cert, key)


def test_no_tls_flags_leave_the_dev_certificate_to_the_server() -> None:
    options = build()
    assert options.tls_cert is None and options.tls_key is None


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--max-size", "-1"], r"--max-size: must not be negative"),
        (["--max-size", "12X"], r"--max-size: '12X' is not a size"),
        (["--max-size", "1.5M"], r"--max-size: '1.5M' is not a size"),
        (["--max-recipients", "-5"], r"--max-recipients: must be at least 1, got -5"),
        (["--max-recipients", "0"], r"--max-recipients: must be at least 1"),
        (["--max-clients", "many"], r"--max-clients: 'many' is not a whole number"),
        (["--max-clients-per-ip", "-1"], r"--max-clients-per-ip: must be at least 1"),
        (["--workers", "0"], r"--workers: must be at least 1, got 0"),
        (["--workers", "-2"], r"--workers: must be at least 1"),
        (["--idle-timeout", "-1"], r"--idle-timeout: must be a positive number of seconds"),
        (["--data-timeout", "0"], r"--data-timeout: must be a positive number"),
        (["--close-timeout", "nan"], r"--close-timeout: must be a positive number"),
        (["--idle-timeout", "inf"], r"--idle-timeout: must be a positive number"),
        (["--proxy-protocol", "10.0.0.1/8"], r"host bits set; did you mean 10\.0\.0\.0/8\?"),
        (["--proxy-protocol", "nonsense"], r"'nonsense' is not a network in CIDR notation"),
        (["--trusted-networks", "10.0.0.0/33"], r"--trusted-networks: '10.0.0.0/33' is not"),
        (["--hostname", "bad name"], r"--hostname: 'bad name' is not a valid host name"),
        (["--hostname", ""], r"--hostname: '' is not a valid host name"),
        (["--auth-user", "alice"], r"--auth-user: expected USER:PASSWORD"),
        (["--auth-user", ":pw"], r"--auth-user: expected USER:PASSWORD"),
        (["--auth-user", "alice:"], r"empty password for user 'alice'"),
        (["--auth-user", "a:1", "--auth-user", "a:2"], r"user 'a' is given twice"),
        (["--maildir", ""], r"--maildir: empty path"),
    ],
)
def test_bad_flag_values(argv: list[str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        build(*argv)


def test_auth_error_does_not_show_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        build("--auth-user", "alice-topsecret")
    assert "topsecret" not in str(caught.value)


def test_tls_cert_without_key(cert_files: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="--tls-cert needs --tls-key"):
        build("--tls-cert", str(cert_files[0]))
    with pytest.raises(ConfigError, match="--tls-key needs --tls-cert"):
        build("--tls-key", str(cert_files[1]))


def test_unreadable_certificate(tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match=r"cannot read TLS certificate .*missing\.pem"):
        build("--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(cert_files[1]))


def test_invalid_certificate(tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="does not contain a PEM certificate"):
        build("--tls-cert", str(bad), "--tls-key", str(cert_files[1]))


def test_key_that_does_not_match(tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    other = tmp_path / "other.pem"
    trustme.CA().issue_cert("x.test").private_key_pem.write_to_path(str(other))
    with pytest.raises(ConfigError, match="does not belong to certificate"):
        build("--tls-cert", str(cert_files[0]), "--tls-key", str(other))


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("[server]\nmax_sise = 10\n", r"unknown key 'max_sise' in \[server\] \(did you mean 'max_size'\?\)"),
        ("[server]\nauth_user = ['a:b']\n", r"did you mean 'auth_users'"),
        ("[server]\nfrobnicate = 1\n", r"unknown key 'frobnicate' in \[server\]$"),
        ("[plugins]\nx = 1\n", r"unknown table \[plugins\]"),
        ("listen = ['127.0.0.1:25']\n", r"unknown key 'listen' at top level; settings go in \[server\]"),
        ("server = 3\n", r"'server' must be a table"),
        ("[server]\nmax_size = \n", r"TOML syntax error: .*line 2"),
        ("[server]\nlisten = [\"a:1\"\n\nx = 1\n", r"TOML syntax error: .*line \d"),
        ("[server]\nmax_size = -5\n", r"max_size: must not be negative, got -5"),
        ("[server]\nmax_size = 1.5\n", r"max_size: expected a number of bytes, got the number 1.5"),
        ("[server]\nworkers = 0\n", r"workers: must be at least 1"),
        ("[server]\nworkers = true\n", r"workers: expected a whole number, got a boolean"),
        ("[server]\nmax_recipients = 2.5\n", r"max_recipients: expected a whole number"),
        ("[server]\nidle_timeout = -3\n", r"idle_timeout: must be a positive number"),
        ("[server]\nidle_timeout = [1]\n", r"idle_timeout: expected a number of seconds, got a list"),
        ("[server]\nlmtp = \"yes\"\n", r"lmtp: expected true or false, got the string 'yes'"),
        ("[server]\nlisten = [25]\n", r"listen: expected a list of strings"),
        ("[server]\nlisten = [\"0.0.0.0:99999\"]\n", r"listen: port 99999 .* out of range"),
        ("[server]\nhostname = 5\n", r"hostname: expected a string, got the number 5"),
        ("[server]\nmaildir = {a = 1}\n", r"maildir: expected a string, got a table"),
        ("[server]\nbare_newline = \"lenient\"\n", r"bare_newline: 'lenient' is not one of reject, strict, normalize"),
        ("[server]\nlog_format = \"xml\"\n", r"log_format: 'xml' is not one of text, json"),
        ("[server]\nmaildir = \"m\"\nmbox = \"x\"\n", r"maildir and mbox exclude each other"),
        ("[server]\nmbox = \"x\"\nsink = true\n", r"mbox and sink exclude each other"),
        ("[server]\nverbose = true\nquiet = true\n", r"verbose and quiet exclude each other"),
        ("[server]\ntrusted_networks = [\"10.0.0.1/8\"]\n", r"trusted_networks: 10.0.0.1/8 has host bits set"),
        ("[server]\ntls_cert = \"c.pem\"\n", r"--tls-cert needs --tls-key"),
    ],
)  # fmt: skip
def test_bad_files(tmp_path: Path, body: str, problem: str) -> None:
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError, match=problem) as caught:
        build("--config", str(path))
    message = str(caught.value)
    assert "\n" not in message
    if "tls-cert" not in problem:
        assert str(path) in message


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.toml: No such file"):
        build("--config", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match=r"cannot read config file .*: Is a directory"):
        build("--config", str(tmp_path))


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[server]\nhostname = "m\xe4il"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml: not UTF-8 text"):
        build("--config", str(path))


def test_dns_table_sets_the_resolver_options(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[dns]\nnameservers = ["127.0.0.1:5353", "::1"]\ntimeout = 2\n')
    options = build("--config", str(path))
    assert options.dns_nameservers == ("127.0.0.1:5353", "::1")
    assert options.dns_timeout == 2.0
    from_code = config.options_from_settings({"dns": {"nameservers": ["127.0.0.1:53"]}})
    assert from_code.dns_nameservers == ("127.0.0.1:53",)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('[dns]\nservers = ["1.2.3.4"]\n', r"unknown key 'servers' in \[dns\]"),
        ('[server]\ndns_timeout = 1\n[dns]\ntimeout = 2\n', r"\[dns\] timeout and dns_timeout both given"),
        ('dns = "1.2.3.4"\n', r"'dns' must be a table"),
        ('[dns]\nnameservers = ["not an address:x"]\n', r"\[dns\] nameservers"),
    ],
)  # fmt: skip
def test_bad_dns_table(tmp_path: Path, body: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        build("--config", str(write_config(tmp_path, body)))
