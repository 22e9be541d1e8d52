"""``mailgate dkim keygen``: the key file it writes and the TXT record it prints (published
as printed in the test DNS zone, the record verifies a signature made with the key), and
[[dkim_sign]] key problems as ``serve`` and ``check-config`` report them."""

from __future__ import annotations

import stat
from pathlib import Path

import dkim
import pytest
from tests.dns_server import DNSTestServer
from tests.outbound.dkim_helpers import txt_lookup

from mailgate import cli, config
from mailgate.queue.dkim_keys import load_signing_key

MESSAGE = (
    b"From: Alice <alice@keys.example>\r\nTo: bob@example.net\r\nSubject: keygen\r\n\r\nhello\r\n"
)


@pytest.fixture(autouse=True)
def fixed_fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "machine_fqdn", lambda: "fqdn.example.test")


def keygen(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(["dkim", "keygen", *args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_keygen_prints_a_record_that_verifies_the_key_s_signatures(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    dns_server: DNSTestServer,
    algorithm: str,
) -> None:
    selector = "rsa" if algorithm == "rsa-sha256" else "ed"
    domain = f"{selector}.keys.example"
    status, out, err = keygen(
        capsys,
        "--domain", domain, "--selector", "s2026", "--algorithm", algorithm,
        "--out", str(tmp_path / "keys"),
    )  # fmt: skip
    assert status == 0, err
    key_file = tmp_path / "keys" / f"{domain}.s2026.key"
    assert f"Private key: {key_file}" in out
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    lines = out.splitlines()
    name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("  name:"))
    value = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("  value:"))
    assert name == f"s2026._domainkey.{domain}"
    kind = "rsa" if algorithm == "rsa-sha256" else "ed25519"
    assert value.startswith(f"v=DKIM1; k={kind}; p=")
    zone = lines[-1]
    assert zone.startswith(f"{name}. 3600 IN TXT ")
    assert (tmp_path / "keys" / f"{domain}.s2026.txt").read_text() == zone + "\n"

    # Published exactly as printed, the record verifies what the key signs.
    dns_server.add(zone + "\n")
    dnsfunc = txt_lookup(dns_server)
    assert dnsfunc(name.encode()) == value.encode()
    key = load_signing_key(key_file, algorithm)  # type: ignore[arg-type]
    message = MESSAGE.replace(b"keys.example", domain.encode())
    signature = dkim.sign(
        message, b"s2026", domain.encode(), key.dkimpy_key,
        signature_algorithm=algorithm.encode(),
    )  # fmt: skip
    assert dkim.verify(signature + message, dnsfunc=dnsfunc)
    assert not dkim.verify(signature + message.replace(b"hello", b"hullo"), dnsfunc=dnsfunc)


def test_rsa_bits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--domain", "example.com", "--selector", "big", "--out", str(tmp_path)]
    status, _, _ = keygen(capsys, *args, "--bits", "3072")
    assert status == 0
    assert load_signing_key(tmp_path / "example.com.big.key", "rsa-sha256").bits == 3072
    status, _, err = keygen(capsys, *args, "--bits", "512", "--force")
    assert status == 2
    assert err.strip() == (
        "mailgate dkim keygen: error: --bits: an RSA key needs at least 1024 bits (RFC 8301)"
    )


def test_an_existing_key_is_kept_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--domain", "example.com", "--selector", "s1", "--out", str(tmp_path)]
    assert keygen(capsys, *args)[0] == 0
    key_file = tmp_path / "example.com.s1.key"
    first = key_file.read_bytes()
    status, out, err = keygen(capsys, *args)
    assert status == 1 and out == ""
    assert f"{key_file} exists" in err and "--force" in err
    assert key_file.read_bytes() == first
    assert keygen(capsys, *args, "--force")[0] == 0
    assert key_file.read_bytes() != first
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--domain", "not a domain", "--selector", "s1"], "--domain: 'not a domain' is not"),
        (["--domain", "example.com", "--selector", "s 1"], "--selector: 's 1' is not a selector"),
    ],
)
def test_wrong_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], error: str
) -> None:
    status, _, err = keygen(capsys, *args, "--out", str(tmp_path))
    assert status == 2 and error in err
    assert list(tmp_path.iterdir()) == []


CONFIG = """\
[server]
listen = "127.0.0.1:2525"
hostname = "mx.example.com"
state_dir = "state"
sink = true

[[routes]]
recipients = ["*"]
action = "relay"

[[dkim_sign]]
domain = "example.com"
selector = "s1"
key_file = "keys/example.com.s1.key"

[[dkim_sign]]
domain = "example.com"
selector = "e1"
key_file = "keys/missing.key"
algorithm = "ed25519-sha256"
"""


def test_a_missing_key_is_one_error_line_for_serve_and_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert keygen(capsys, "--domain", "example.com", "--selector", "s1",
                  "--out", str(tmp_path / "keys"))[0] == 0  # fmt: skip
    path = tmp_path / "mailgate.toml"
    path.write_text(CONFIG, encoding="utf-8")
    expected = (
        f"{path} [[dkim_sign]] #2 key_file: cannot read {tmp_path / 'keys' / 'missing.key'}: "
        "No such file or directory (make one with: mailgate dkim keygen)"
    )
    assert cli.main(["serve", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert err == f"mailgate: error: {expected}\n"
    assert cli.main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert expected in out + err
    assert "Traceback" not in out + err

    # With the key made, the configuration is fine.
    assert keygen(capsys, "--domain", "example.com", "--selector", "e1", "--algorithm",
                  "ed25519-sha256", "--out", str(tmp_path / "keys"))[0] == 0  # fmt: skip
    (tmp_path / "keys" / "example.com.e1.key").rename(tmp_path / "keys" / "missing.key")
    assert cli.main(["check-config", "--config", str(path)]) == 0, capsys.readouterr()


def test_sendmail_signs_what_it_queues_and_queue_commands_need_no_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    dns_server: DNSTestServer,
) -> None:
    """``mailgate sendmail`` writes into the queue itself, so it signs as the server
    would; ``mailgate queue`` reads the configuration without reading the keys."""
    from tests.cli.conftest import Stdin, closed_port, write_config
    from tests.cli.test_sendmail import queued

    config = write_config(tmp_path / "mailgate.toml", closed_port())
    assert keygen(capsys, "--domain", "sendmail.example", "--selector", "s1",
                  "--out", str(tmp_path / "keys"))[0] == 0  # fmt: skip
    dns_server.add((tmp_path / "keys" / "sendmail.example.s1.txt").read_text())
    with config.open("a", encoding="utf-8") as file:
        file.write(
            "\n[[dkim_sign]]\n"
            'domain = "sendmail.example"\nselector = "s1"\n'
            'key_file = "keys/sendmail.example.s1.key"\n'
        )
    monkeypatch.setattr(
        "sys.stdin",
        Stdin(b"From: Cron <cron@sendmail.example>\nSubject: nightly\n\nAll good.\n"),
    )
    assert cli.main(["sendmail", "--config", str(config), "bob@example.net"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    [(message, body)] = queued(config)
    assert body.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    dnsfunc = txt_lookup(dns_server)
    assert dkim.verify(body, dnsfunc=dnsfunc)
    assert not dkim.verify(body.replace(b"All good.", b"All bad."), dnsfunc=dnsfunc)

    # The key gone: the queue commands still work; sendmail refuses to queue unsigned.
    (tmp_path / "keys" / "sendmail.example.s1.key").unlink()
    assert cli.main(["queue", "list", "--config", str(config)]) == 0
    assert message.id in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", Stdin(b"From: cron@sendmail.example\n\nAgain.\n"))
    assert cli.main(["sendmail", "--config", str(config), "bob@example.net"]) == 78
    err = capsys.readouterr().err
    assert "[[dkim_sign]] #1 key_file: cannot read" in err and "nothing queued" in err
    assert len(queued(config)) == 1
