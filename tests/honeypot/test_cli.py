"""``mailgate honeypot``: flags, the TOML file (mode = "honeypot", [honeypot]), the safe
settings a honeypot server gets, and the real command in a subprocess (attacked, stopped
with SIGTERM, then reported on)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import mailgate.honeypot.mode
from mailgate import cli, config
from mailgate.cli.honeypot import add_honeypot_parser
from mailgate.config import (
    HONEYPOT_KEYS,
    ConfigError,
    HoneypotOptions,
    build_honeypot_options,
    flag_name,
)
from mailgate.honeypot.mode import (
    FALLBACK_MAX_SIZE,
    build_server,
    honeypot_server_options,
    load_persona,
)
from mailgate.honeypot.personas import PERSONAS
from mailgate.plugins.lists import Lists
from mailgate.plugins.rate_limits import RateLimits
from mailgate.server.options import ListenAddress, ServerOptions

SRC = str(Path(mailgate.honeypot.mode.__file__).resolve().parents[2])


@pytest.fixture(autouse=True)
def fixed_fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "machine_fqdn", lambda: "fqdn.example.test")


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["honeypot", *argv])


def build(*argv: str) -> tuple[ServerOptions, HoneypotOptions]:
    return build_honeypot_options(parse(*argv))


def write(tmp_path: Path, text: str, name: str = "honeypot.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --- flags and file ---------------------------------------------------------------------------


def test_every_flag(tmp_path: Path) -> None:
    options, hp = build(
        "--persona", "exim",
        "--profile", "custom.toml",
        "--listen", "127.0.0.1:2525",
        "--data-dir", "hp-data",
        "--jsonl", "-",
        "--auth-outcome", "accept-after:3",
        "--drop-after-credentials",
        "--tarpit", "0.5",
        "--max-session", "120",
        "--max-storage", "10M",
        "--block-networks", "192.0.2.0/24,198.51.100.7",
        "--block-networks", "2001:db8::/32",
        "--connections-per-ip", "30/10m",
        "--hostname", "mx.example.net",
        "--max-auth-failures", "5",
    )  # fmt: skip
    assert options.listen == (ListenAddress("127.0.0.1", 2525),)
    assert options.hostname == "mx.example.net"
    assert options.max_auth_failures == 5
    assert hp.data_dir == Path("hp-data")
    assert hp.persona == "exim"
    assert hp.profile == Path("custom.toml")
    assert hp.jsonl == "-"
    assert hp.auth_outcome == "accept-after:3"
    assert hp.drop_after_credentials is True
    assert hp.tarpit == 0.5
    assert hp.max_session == 120
    assert hp.max_storage == 10 * 1024**2
    assert [str(n) for n in hp.block_networks] == [
        "192.0.2.0/24",
        "198.51.100.7/32",
        "2001:db8::/32",
    ]
    assert hp.connections_per_ip == "30/10m"
    assert {"listen", "hostname", "max_auth_failures"} <= hp.given
    assert "max_size" not in hp.given


def test_defaults() -> None:
    options, hp = build("--data-dir", "d")
    assert hp == HoneypotOptions(data_dir=Path("d"), given=frozenset())
    assert hp.persona == "postfix" and hp.auth_outcome == "refuse"
    assert hp.max_session == 600 and hp.max_storage == 1024**3
    assert options.listen == (ListenAddress("127.0.0.1", 2525),)


def test_zero_turns_limits_off() -> None:
    _, hp = build("--data-dir", "d", "--max-session", "0", "--max-storage", "0")
    assert hp.max_session is None and hp.max_storage is None


def test_every_honeypot_key_is_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    namespace = parse()
    assert set(HONEYPOT_KEYS) <= set(vars(namespace))
    parser = argparse.ArgumentParser()
    add_honeypot_parser(parser.add_subparsers())
    honeypot = parser._subparsers._group_actions[0].choices["honeypot"]  # type: ignore[union-attr]
    flags = {}
    for action in honeypot._actions:
        for option in action.option_strings:
            flags[option] = action
    for key in HONEYPOT_KEYS:
        action = flags[flag_name(key)]
        assert action.dest == key
        assert "(default:" in action.help or "(required)" in action.help, key
    # Every run flag states its default, and every [server] key it has is a real one.
    for option, action in flags.items():
        if option.startswith("--") and option != "--help":
            assert "(default:" in action.help or "(required)" in action.help, option
            assert (
                action.dest in HONEYPOT_KEYS
                or action.dest in config.KEYS
                or (action.dest == "config")
            ), option
    assert cli.main(["honeypot", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for fixed in (
        "--persona",
        "--listen HOST:PORT",
        "--data-dir DIR",
        "report",
        "sessions",
        "show",
    ):
        assert fixed in text


def test_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        mode = "honeypot"
        listen = ["127.0.0.1:2526"]
        hostname = "mx1.example.org"
        max_size = "5M"

        [honeypot]
        persona = "exchange"
        data_dir = "data"
        jsonl = "capture.jsonl"
        auth_outcome = "accept"
        drop_after_credentials = true
        tarpit = 1
        max_session = 60
        max_storage = "2G"
        block_networks = ["203.0.113.0/24"]
        connections_per_ip = "5/1m"

        [limits]
        messages_per_ip = "100/1h"
        """,
    )
    options, hp = build("--config", str(path))
    assert hp.data_dir == tmp_path / "data"  # relative to the file
    assert hp.jsonl == str(tmp_path / "capture.jsonl")
    assert hp.persona == "exchange" and hp.auth_outcome == "accept"
    assert hp.drop_after_credentials and hp.tarpit == 1.0 and hp.max_session == 60
    assert hp.max_storage == 2 * 1024**3
    assert [str(n) for n in hp.block_networks] == ["203.0.113.0/24"]
    assert hp.connections_per_ip == "5/1m"
    assert options.hostname == "mx1.example.org" and options.max_size == 5 * 1024**2
    assert [s.name for s in options.policy] == ["limits"]
    assert {"listen", "hostname", "max_size"} <= hp.given

    # Flags override the file, key by key.
    _, hp = build("--config", str(path), "--persona", "exim", "--data-dir", "elsewhere")
    assert hp.persona == "exim" and hp.data_dir == Path("elsewhere")
    assert hp.auth_outcome == "accept"


def test_mode_is_optional_for_mailgate_honeypot(tmp_path: Path) -> None:
    path = write(tmp_path, "[honeypot]\ndata_dir = 'd'\n")
    _, hp = build("--config", str(path))
    assert hp.data_dir == tmp_path / "d"


def test_serve_runs_a_honeypot_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        """
        [server]
        mode = "honeypot"
        listen = "127.0.0.1:2527"
        [honeypot]
        persona = "sendmail"
        data_dir = "data"
        """,
    )
    calls: list[tuple[ServerOptions, HoneypotOptions]] = []
    monkeypatch.setattr(
        mailgate.honeypot.mode, "run", lambda options, hp: calls.append((options, hp)) or 0
    )
    assert cli.main(["serve", "--config", str(path), "--hostname", "mx.flag.example"]) == 0
    [(options, hp)] = calls
    assert hp.persona == "sendmail" and hp.data_dir == tmp_path / "data"
    assert options.hostname == "mx.flag.example"  # serve's flags still apply
    assert cli.main(["honeypot", "--config", str(path)]) == 0
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("body", "argv", "problem"),
    [
        ("[server]\nmode = 'honeypot'\n", ["serve"], None),  # placeholder: see below
        ("[server]\nmode = 'server'\n", ["honeypot"], r"mode: this file is for server mode"),
        ("[server]\nmode = 'hunny'\n", ["honeypot"], r"mode: 'hunny' is not one of server, honeypot"),
        ("[honeypot]\ndata_dir = 'd'\n", ["serve"], r"\[honeypot\]: a \[honeypot\] table needs mode"),
        ("[honeypot]\npersonna = 'exim'\n", ["honeypot"], r"unknown key 'personna' in \[honeypot\] \(did you mean 'persona'\?\)"),
        ("[honeypot]\npersona = 'qmail'\n", ["honeypot"], r"\[honeypot\] persona: 'qmail' is not one of postfix, exim"),
        ("[honeypot]\nauth_outcome = 'maybe'\n", ["honeypot"], r"auth_outcome: must be refuse, accept or accept-after:N"),
        ("[honeypot]\nconnections_per_ip = '5'\n", ["honeypot"], r"connections_per_ip: .*5"),
        ("[honeypot]\ntarpit = -1\n", ["honeypot"], r"tarpit: must be zero or a positive number"),
        ("[honeypot]\nmax_storage = 'lots'\n", ["honeypot"], r"max_storage: 'lots' is not a size"),
        ("[honeypot]\nblock_networks = ['10.0.0.1/8']\n", ["honeypot"], r"10.0.0.1/8 has host bits set"),
        ("[honeypot]\ndata_dir = 'd'\nblock_networks = ['10.0.0.0/8']\n[lists]\nblock_networks = ['10.1.0.0/16']\n",
         ["honeypot"], r"\[lists\] block_networks is set too; keep one"),
        ("[server]\nmaildir = 'mail'\n[honeypot]\ndata_dir = 'd'\n", ["honeypot"],
         r"maildir: not for honeypot mode: a honeypot never delivers"),
        ("[server]\nforward = ['smtp://127.0.0.1:2525']\n", ["honeypot"], r"forward: not for honeypot mode"),
        ("[server]\nwebhook = ['http://127.0.0.1/x']\n", ["honeypot"], r"webhook: not for honeypot mode"),
        ("[server]\nrelay_networks = ['10.0.0.0/8']\n", ["honeypot"], r"relay_networks: not for honeypot mode: a honeypot accepts mail for every domain"),
        ("[server]\nauth_users = ['a:b']\n", ["honeypot"], r"auth_users: not for honeypot mode: a honeypot answers AUTH itself"),
        ("[server]\nstate_dir = 's'\n", ["honeypot"], r"state_dir: not for honeypot mode"),
        ("[server]\nworkers = 4\n", ["honeypot"], r"workers: honeypot mode runs in one process"),
        ("[server]\nlisten = '127.0.0.1:25'\n", ["honeypot"], r"honeypot mode needs a data directory: --data-dir DIR"),
    ],
)  # fmt: skip
def test_bad_files(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    body: str,
    argv: list[str],
    problem: str | None,
) -> None:
    path = write(tmp_path, body)
    if problem is None:
        # mailgate serve with a honeypot file but no data directory: the honeypot's error.
        problem = r"honeypot mode needs a data directory"
    status = cli.main([*argv, "--config", str(path)])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert re.search(problem, lines[0]), lines[0]
    assert lines[0].startswith("mailgate: error: ")


def test_serve_only_flags_are_refused_with_a_honeypot_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[server]\nmode = 'honeypot'\n[honeypot]\ndata_dir = 'd'\n")
    assert cli.main(["serve", "--config", str(path), "--maildir", "m"]) == 2
    assert "--maildir: not for honeypot mode" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--persona", "qmail"], "invalid choice: 'qmail'"),
        (["--data-dir", "d", "--auth-outcome", "accept-after:0"], "--auth-outcome: must be"),
        (["--data-dir", "d", "--connections-per-ip", "many"], "--connections-per-ip:"),
        (["--data-dir", "d", "--listen", "nowhere"], "--listen: 'nowhere' is not HOST:PORT"),
        (["--listen", "127.0.0.1:0"], "needs a data directory"),
    ],
)
def test_bad_flags(capsys: pytest.CaptureFixture[str], argv: list[str], problem: str) -> None:
    assert cli.main(["honeypot", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and problem in err, err


def test_report_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["report"], "--data-dir DIR is required"),
        (["report", "--data-dir", str(tmp_path / "missing")], "does not exist"),
        (["sessions", "--data-dir", str(tmp_path)], "no capture database in"),
        (["show", "X", "--data-dir", str(tmp_path)], "no capture database in"),
    ]
    for argv, problem in cases:
        assert cli.main(["honeypot", *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and problem in err, err


# --- the honeypot server's settings --------------------------------------------------------------


def test_safe_settings_and_persona_defaults(tmp_path: Path) -> None:
    options = ServerOptions(
        maildir=Path("maildir"), relay_networks=(), workers=1, allow_insecure_auth=False
    )
    hp = HoneypotOptions(data_dir=tmp_path / "d", persona="exchange")
    profile = PERSONAS["exchange"]
    result = honeypot_server_options(options, hp, profile)
    assert result.delivery == "sink" and result.forward == () and result.webhook == ()
    assert result.open_relay and result.relay_networks == () and result.local_domains == ()
    assert result.state_dir == tmp_path / "d" / "state"
    assert result.allow_insecure_auth is True
    assert result.hostname == profile.hostname
    assert result.max_size == profile.message_size_limit
    assert result.auth_mechanisms == profile.auth_mechanisms
    assert result.persona is profile.persona
    assert result.received_header is False

    # What the settings name wins over the persona.
    given = dataclassify(hp, given=frozenset({"hostname", "max_size", "auth_mechanisms"}))
    named = ServerOptions(hostname="mx.mine.example", max_size=1000, auth_mechanisms=("PLAIN",))
    result = honeypot_server_options(named, given, profile)
    assert (result.hostname, result.max_size, result.auth_mechanisms) == (
        "mx.mine.example",
        1000,
        ("PLAIN",),
    )
    # A persona that advertises SIZE without a number still gets a limit.
    sendmail = honeypot_server_options(ServerOptions(), hp, PERSONAS["sendmail"])
    assert PERSONAS["sendmail"].message_size_limit is None
    assert sendmail.max_size == FALLBACK_MAX_SIZE


def test_code_settings_a_honeypot_cannot_honour_are_refused(tmp_path: Path) -> None:
    hp = HoneypotOptions(data_dir=tmp_path / "d")
    profile = PERSONAS["postfix"]
    for options, name in (
        (ServerOptions(forward=("smtp://127.0.0.1:2525",)), "forward"),
        (ServerOptions(webhook=("http://127.0.0.1/x",)), "webhook"),
        (ServerOptions(delivery="mbox", mbox=Path("x")), "mbox"),
        (ServerOptions(auth_users=(("a", "b"),)), "auth_users"),
        (ServerOptions(local_domains=("example.com",)), "local_domains"),
        (ServerOptions(workers=2), "one process"),
    ):
        with pytest.raises(ConfigError, match=name):
            honeypot_server_options(options, hp, profile)


def dataclassify(hp: HoneypotOptions, **changes: Any) -> HoneypotOptions:
    import dataclasses

    return dataclasses.replace(hp, **changes)


def test_build_server(tmp_path: Path) -> None:
    profile_file = write(
        tmp_path,
        """
        base = "postfix"
        banner = "{hostname} ESMTP ready"
        """,
        "mine.toml",
    )
    hp = HoneypotOptions(
        data_dir=tmp_path / "d",
        profile=profile_file,
        block_networks=(),
        connections_per_ip="10/1m",
        auth_outcome="accept-after:2",
        tarpit=0.25,
        max_session=30,
    )
    server = build_server(ServerOptions(listen=(ListenAddress("127.0.0.1", 0),)), hp)
    try:
        assert server.profile.persona.banner == "{hostname} ESMTP ready"
        assert server.options.tls_cert == tmp_path / "d" / "state" / "dev-cert.pem"
        assert server.options.tls_cert.exists()
        names = [getattr(p, "name", None) for p in server.hooks.plugins()]
        assert names == ["rate-limits", "honeypot"]
        limits = next(p for p in server.hooks.plugins() if isinstance(p, RateLimits))
        assert str(limits.connections_per_ip) in ("10/1m", "10/60s", "10/m")
        assert not any(isinstance(p, Lists) for p in server.hooks.plugins())
        assert server.plugin.accept_after == 2 and server.plugin.tarpit == 0.25
        assert server.plugin.max_session_seconds == 30
        assert server.recorder is server.plugin.recorder
    finally:
        server.store.close()


def test_bad_profile_is_a_config_error(tmp_path: Path) -> None:
    profile_file = write(tmp_path, 'banner = "{hostname} {nope}"\n', "bad.toml")
    with pytest.raises(ConfigError, match=r"bad\.toml: banner: .*nope"):
        load_persona(HoneypotOptions(data_dir=tmp_path, profile=profile_file))


# --- the real command ----------------------------------------------------------------------------


class Process:
    """``python -m mailgate ...`` with its stderr collected; the port read from its log."""

    LISTENING = re.compile(r"listening on \S+ port (\d+)")

    def __init__(self, *argv: str, cwd: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailgate", *argv],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self.out: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        self._threads = [
            threading.Thread(target=self._read_err, daemon=True),
            threading.Thread(target=self._read_out, daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        if not self._ready.wait(20) or not self.port:
            self.proc.kill()
            raise AssertionError("honeypot did not start:\n" + "\n".join(self.log))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))
            match = self.LISTENING.search(line)
            if match and not self.port:
                self.port = int(match[1])
                self._ready.set()
        self._ready.set()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.append(line.rstrip("\n"))

    def wait_for_log(self, needle: str, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in line for line in self.log):
                return
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not logged:\n" + "\n".join(self.log))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(15)
        for thread in self._threads:
            thread.join(5)
        return code


def run_module(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "mailgate", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def banner(port: int, ip: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(ip, 0)) as s:
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(1024)
            if not chunk:
                break
            data += chunk
        return data


def test_the_command_end_to_end(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    process = Process(
        "honeypot",
        "--persona", "exchange",
        "--listen", "127.0.0.1:0",
        "--data-dir", str(data_dir),
        "--jsonl", "-",
        "--hostname", "EXCH07.corp.example",
        "--auth-outcome", "accept-after:3",
        "--auth-failure-delay", "0",
        "--block-networks", "127.0.0.66/32",
        "--connections-per-ip", "3/1m",
        "--max-session", "1",
        cwd=tmp_path,
    )  # fmt: skip
    profile = PERSONAS["exchange"]
    try:
        port = process.port
        # Brute force: two refused, the third accepted, then a message.
        with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0), timeout=10) as smtp:
            code, text = smtp.ehlo("attacker.example")
            assert code == 250 and b"AUTH LOGIN" in text and b"STARTTLS" in text
            for user, password in (("administrator", "Winter2026!"), ("admin", "P@ssw0rd")):
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    smtp.login(user, password)
            smtp.login("administrator", "Summer2026!")
            refused = smtp.sendmail(
                "ceo@corp.example", ["victim@gmail.com"], b"Subject: hi\r\n\r\n."
            )
            assert refused == {}
        # Blocked network: the persona's refusal as the banner.
        host = "EXCH07.corp.example"
        rejected = profile.format("rejected", hostname=host, client_ip="127.0.0.66", address="")
        assert banner(port, "127.0.0.66") == rejected.render(False)  # no EHLO yet
        # Rate limit: the fourth connection in a minute gets the persona's 421.
        for _ in range(3):
            assert banner(port, "127.0.0.77").startswith(b"220 EXCH07.corp.example Microsoft")
        too_many = profile.format("too_many_connections", hostname=host, client_ip="127.0.0.77")
        assert banner(port, "127.0.0.77") == too_many.render(False)
        # A silent session is closed after --max-session with the persona's timeout text.
        with socket.create_connection(
            ("127.0.0.1", port), timeout=5, source_address=("127.0.0.8", 0)
        ) as silent:
            received = b""
            for _ in range(20):
                chunk = silent.recv(4096)
                if not chunk:
                    break
                received += chunk
        timeout_reply = profile.format("idle_timeout", hostname=host, client_ip="127.0.0.8")
        assert received.startswith(b"220 ") and received.endswith(timeout_reply.render(False))
    finally:
        status = process.stop()
    assert status == 0, "\n".join(process.log)
    log = "\n".join(process.log)
    assert "Traceback" not in log
    assert log.count("honeypot mode: persona exchange as EXCH07.corp.example") == 1
    # One warning line at start: no open-relay or development-certificate warnings.
    start = [line for line in process.log if " WARNING " in line]
    assert len(start) == 1, start
    assert "open_relay" not in log and "development certificate" not in log

    # JSON lines on stdout.
    events = [json.loads(line) for line in process.out]
    auth = [e for e in events if e["type"] == "auth"]
    assert [e["outcome"] for e in auth] == ["refused", "refused", "accepted"]
    assert auth[0]["password"] == "Winter2026!"
    assert any(e["type"] == "message" and e["rcpt_tos"] == ["victim@gmail.com"] for e in events)

    # The reports, after the honeypot stopped.
    report = run_module("honeypot", "report", "--data-dir", str(data_dir), "--format", "json")
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    assert summary["sessions"] == 7  # brute force, blocked, 3 + 1 rate-limited, silent
    assert summary["messages"] == 1 and summary["auth_attempts"] == 3
    assert summary["auth_accepted"] == 1
    tops = {name: {r["value"]: r["count"] for r in rows} for name, rows in summary["top"].items()}
    assert tops["usernames"] == {"administrator": 2, "admin": 1}
    assert tops["ips"]["127.0.0.77"] == 4
    assert tops["passwords"]["P@ssw0rd"] == 1

    table = run_module("honeypot", "report", "--data-dir", str(data_dir), "--since", "1h")
    assert table.returncode == 0 and "administrator" in table.stdout
    assert "Top passwords" in table.stdout and "127.0.0.77" in table.stdout

    rows = list(csv.reader(io.StringIO(run_module(
        "honeypot", "report", "--data-dir", str(data_dir), "--format", "csv").stdout)))  # fmt: skip
    assert rows[0] == ["section", "value", "count", "detail"]
    assert ["usernames", "administrator", "2", ""] in rows

    listing = run_module(
        "honeypot", "sessions", "--data-dir", str(data_dir), "--ip", "127.0.0.2", "--format", "json"
    )
    [session] = json.loads(listing.stdout)
    assert session["user"] == "administrator" and session["messages"] == 1
    assert session["auth_attempts"] == 3 and session["close_reason"] == "quit"
    limited_rows = run_module(
        "honeypot", "sessions", "--data-dir", str(data_dir), "--ip", "127.0.0.0/24", "--limit", "2"
    )
    assert len(limited_rows.stdout.splitlines()) == 3  # header + 2

    ambiguous = run_module("honeypot", "show", session["id"][:4], "--data-dir", str(data_dir))
    assert ambiguous.returncode == 2 and "matches several sessions" in ambiguous.stderr
    shown = run_module("honeypot", "show", session["id"], "--data-dir", str(data_dir))
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert f"session {session['id']}" in text
    assert "S: 220 EXCH07.corp.example Microsoft ESMTP MAIL Service ready at" in text
    assert "C: AUTH LOGIN" in text
    assert "[AUTH LOGIN user=administrator password=Summer2026! -> accepted]" in text
    assert "[message " in text and "<victim@gmail.com>" in text
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{3} C: QUIT$", text, re.M)


def test_serve_with_a_honeypot_file_in_a_process(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        mode = "honeypot"
        listen = "127.0.0.1:0"
        hostname = "mx.sendmail.example"

        [honeypot]
        persona = "sendmail"
        data_dir = "data"
        """,
    )
    process = Process("serve", "--config", str(path), cwd=tmp_path)
    try:
        greeting = banner(process.port, "127.0.0.9")
    finally:
        assert process.stop() == 0
    assert greeting.startswith(
        b"220 mx.sendmail.example ESMTP Sendmail 8.17.1.9/8.17.1.9/Debian-2+deb12u2; "
    )
    report = run_module(
        "honeypot", "report", "--data-dir", str(tmp_path / "data"), "--format", "json"
    )
    assert json.loads(report.stdout)["unique_ips"] == 1
