"""``mailgate check-config``: everything ``serve`` would read, checked without starting:
"ok" and a summary, or every problem found (exit status 2); no port bound, nothing
written."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mailgate import cli, config
from mailgate.server.tls import ensure_dev_certificate

SRC = Path(cli.__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fixed_fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "machine_fqdn", lambda: "fqdn.example.test")


@pytest.fixture
def no_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> None:
        raise AssertionError("check-config bound a socket")

    monkeypatch.setattr(socket.socket, "bind", refuse)


def tree(root: Path) -> dict[str, int]:
    """Every file and directory under root, with its modification time."""
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in root.rglob("*")}


def certificate(directory: Path) -> tuple[Path, Path]:
    return ensure_dev_certificate(directory, "mx.example.com")


GOOD = """\
[server]
listen = ["127.0.0.1:2525", "[::1]:2525"]
smtps_listen = ["127.0.0.1:4650"]
hostname = "mx.example.com"
local_domains = ["example.com"]
maildir = "mail"
state_dir = "state"
tls_cert = "certs/dev-cert.pem"
tls_key = "certs/dev-key.pem"
auth_users = ["alice:secret"]

[lists]
block_networks_file = "blocked.txt"

[limits]
messages_per_ip = "100/1h"

[[routes]]
name = "ours"
recipients = ["*@example.com"]
action = "deliver"

[[routes]]
name = "nobody-else"
recipients = ["*"]
action = "reject"
"""


def test_ok_prints_what_would_run_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_binding: None
) -> None:
    certificate(tmp_path / "certs")
    (tmp_path / "blocked.txt").write_text("192.0.2.0/24\n")
    path = tmp_path / "mailgate.toml"
    path.write_text(GOOD)
    before = tree(tmp_path)

    assert cli.main(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == "ok"
    summary = "\n".join(lines[1:])
    assert "listen: 127.0.0.1:2525 (SMTP), [::1]:2525 (SMTP), 127.0.0.1:4650 (SMTPS)" in summary
    assert "hostname: mx.example.com" in summary
    assert f"TLS: certificate {tmp_path / 'certs' / 'dev-cert.pem'}" in summary
    assert f"delivery: Maildir {tmp_path / 'mail'}" in summary
    assert "auth: 1 --auth-user" in summary
    assert "local domains: example.com" in summary
    assert "policies: lists, relay, routing, rate-limits" in summary
    assert "routes: 2 rules" in summary
    # Neither the Maildir nor the state directory was made, nothing else was written.
    assert tree(tmp_path) == before


def test_flags_override_the_file_as_for_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_binding: None
) -> None:
    certificate(tmp_path / "certs")
    (tmp_path / "blocked.txt").write_text("")
    path = tmp_path / "mailgate.toml"
    path.write_text(GOOD)
    argv = ["check-config", "--config", str(path), "--sink", "--listen", "0.0.0.0:25"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "delivery: sink" in out
    assert "listen: 0.0.0.0:25 (SMTP)" in out


def test_capture_mode_is_summarised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_binding: None
) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text(f'[server]\ncapture = "{tmp_path / "captured"}"\n')
    assert cli.main(["check-config", "--config", str(path)]) == 0
    assert f"delivery: capture {tmp_path / 'captured'}" in capsys.readouterr().out


def test_warnings_the_start_would_log_are_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_binding: None
) -> None:
    argv = ["check-config", "--listen", "0.0.0.0:25", "--state-dir", str(tmp_path / "s")]
    assert cli.main([*argv, "--maildir", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok\n")
    [warning] = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert "no local_domains while listening on 0.0.0.0:25" in warning
    assert 'local_domains = ["example.com"]' in warning


BAD = """\
[server]
max_size = "lots"
workers = 0
state_dir = "afile"
mbox = "missing/all.mbox"
users_file = "no-users"
tls_cert = "one/dev-cert.pem"
tls_key = "two/dev-key.pem"
dns_nameservers = ["resolver.example"]

[limits]
mesages_per_ip = "100/1h"

[greylisting]
delay = "5m"
retry_window = "1m"

[[routes]]
name = "typo"
recipent = ["*"]
action = "deliver"

[queue]
lifetime = "forever"
"""


def test_every_problem_is_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_binding: None
) -> None:
    (tmp_path / "afile").write_text("")
    certificate(tmp_path / "one")
    certificate(tmp_path / "two")  # another key: the pair does not match
    path = tmp_path / "mailgate.toml"
    path.write_text(BAD)
    before = tree(tmp_path)

    assert cli.main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert all(line.startswith("mailgate: error: ") for line in lines[:-1])
    expected = [
        f"{path}: max_size: 'lots' is not a size",
        f"{path}: workers: must be at least 1, got 0",
        f"{path}: dns_nameservers: name server 'resolver.example' must be an IP address",
        f"TLS key {tmp_path / 'two' / 'dev-key.pem'} does not belong to certificate "
        f"{tmp_path / 'one' / 'dev-cert.pem'}",
        f"{path} [[routes]] #1: unknown key 'recipent'",
        f"{path} [queue] lifetime:",
        f"{path}: state_dir {tmp_path / 'afile'}: exists and is not a directory",
        f"{path}: mbox {tmp_path / 'missing' / 'all.mbox'}: directory {tmp_path / 'missing'} "
        "does not exist",
        f"{path} [limits]: unknown key 'mesages_per_ip' (did you mean 'messages_per_ip'?)",
        f"{path} [greylisting]: retry_window (60 s) must be longer than delay (300 s)",
        f"{path}: users_file: users file {tmp_path / 'no-users'} does not exist",
    ]
    for needle in expected:
        assert any(needle in line for line in lines), (needle, lines)
    assert lines[-1] == f"mailgate check-config: {len(lines) - 1} problems found"
    assert len(lines) - 1 == len(expected), lines
    assert tree(tmp_path) == before


def test_as_a_command(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text("[server]\nstate_dir = 'afile'\n[limits]\nmax_messages = 1\n")
    (tmp_path / "afile").write_text("")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "mailgate", "check-config", "--config", "m.toml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "mailgate: error: m.toml: state_dir afile: exists and is not a directory",
        "mailgate: error: m.toml [limits]: unknown key 'max_messages' (did you mean 'max_keys'?)",
        "mailgate check-config: 2 problems found",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "m.toml"]


def test_a_file_that_cannot_be_read_is_one_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check-config", "--config", str(tmp_path / "none.toml")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"mailgate: error: cannot read config file {tmp_path / 'none.toml'}: No such file or directory",
        "mailgate check-config: 1 problem found",
    ]


def test_the_state_directory_is_checked_only_when_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_binding: None
) -> None:
    # Own certificate, Maildir delivery (spooled in the Maildir's tmp/): nothing goes to
    # the state directory, so one that cannot be made (cwd "/" under systemd) is fine.
    cert, key = certificate(tmp_path / "certs")
    (tmp_path / "afile").write_text("")
    argv = [
        "check-config",
        "--state-dir",
        str(tmp_path / "afile"),
        "--maildir",
        str(tmp_path / "m"),
    ]
    assert cli.main([*argv, "--tls-cert", str(cert), "--tls-key", str(key)]) == 0
    assert capsys.readouterr().out.startswith("ok\n")
    # Without a certificate the development one is made there: a problem.
    assert cli.main(argv) == 2
    assert "--state-dir" in capsys.readouterr().err
