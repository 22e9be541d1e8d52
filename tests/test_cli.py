"""The mailgate command: arguments, help, exit statuses and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import mailgate.composition.server
from mailgate import __version__, cli, config, protocol
from mailgate.config import KEYS, flag_name
from mailgate.server.errors import StartupError
from mailgate.server.options import ListenAddress, ServerOptions


@pytest.fixture(autouse=True)
def fixed_fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "machine_fqdn", lambda: "fqdn.example.test")


Reloader = Callable[[], ServerOptions]


@pytest.fixture
def run_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[ServerOptions, Reloader]]:
    """Replace mailgate.composition.server.run; the options and reloader it was called with."""
    calls: list[tuple[ServerOptions, Reloader]] = []

    def fake_run(options: ServerOptions, *, reload_options: Reloader) -> int:
        calls.append((options, reload_options))
        return 0

    monkeypatch.setattr(mailgate.composition.server, "run", fake_run)
    return calls


def replace_run(monkeypatch: pytest.MonkeyPatch, run: Callable[[ServerOptions], int]) -> None:
    monkeypatch.setattr(mailgate.composition.server, "run", lambda options, *_, **__: run(options))


def assert_one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    build = "compiled with mypyc" if protocol.COMPILED else "pure Python"
    assert capsys.readouterr().out == f"mailgate {__version__} ({build})\n"


def test_serve_runs_the_server_with_the_options(
    run_calls: list[tuple[ServerOptions, Reloader]],
) -> None:
    assert cli.main(["serve", "--listen", "127.0.0.1:2600", "--sink", "--lmtp"]) == 0
    [(options, _)] = run_calls
    assert options.listen == (ListenAddress("127.0.0.1", 2600),)
    assert options.delivery == "sink"
    assert options.lmtp is True
    assert options.hostname == "fqdn.example.test"


def test_serve_reads_the_config_file(
    run_calls: list[tuple[ServerOptions, Reloader]], tmp_path: Path
) -> None:
    path = tmp_path / "m.toml"
    path.write_text('[server]\nmax_recipients = 7\nlisten = "127.0.0.1:2601"\n')
    assert cli.main(["serve", "--config", str(path), "--max-recipients", "9"]) == 0
    [(options, _)] = run_calls
    assert options.max_recipients == 9
    assert options.listen == (ListenAddress("127.0.0.1", 2601),)


def test_reload_reads_the_file_again_under_the_flags(
    run_calls: list[tuple[ServerOptions, Reloader]], tmp_path: Path
) -> None:
    path = tmp_path / "m.toml"
    path.write_text("[server]\nmax_recipients = 7\nmax_clients = 10\n")
    assert cli.main(["serve", "--config", str(path), "--max-recipients", "9"]) == 0
    [(options, reload_options)] = run_calls
    assert (options.max_recipients, options.max_clients) == (9, 10)

    path.write_text("[server]\nmax_recipients = 8\nmax_clients = 11\n")
    reloaded = reload_options()
    assert (reloaded.max_recipients, reloaded.max_clients) == (9, 11)

    path.write_text("[server]\nmax_clients = -1\n")
    with pytest.raises(config.ConfigError, match="max_clients"):
        reload_options()


def test_the_servers_exit_status_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    replace_run(monkeypatch, lambda options: 3)
    assert cli.main(["serve"]) == 3


def test_startup_error_is_one_line_and_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(options: ServerOptions) -> int:
        raise StartupError("cannot listen on 127.0.0.1:2525: address already in use")

    replace_run(monkeypatch, run)
    assert cli.main(["serve"]) == 2
    line = assert_one_line_error(capsys, "address already in use")
    assert line.startswith("mailgate: cannot start:")


def test_config_error_from_the_server_is_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(options: ServerOptions) -> int:
        raise config.ConfigError("state dir is a file")

    replace_run(monkeypatch, run)
    assert cli.main(["serve"]) == 2
    assert_one_line_error(capsys, "state dir is a file")


def test_interrupt_is_quiet(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(options: ServerOptions) -> int:
        raise KeyboardInterrupt

    replace_run(monkeypatch, run)
    assert cli.main(["serve"]) == 130
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["serve", "--listen", "bad"], "--listen: 'bad' is not HOST:PORT"),
        (["serve", "--listen", "127.0.0.1:70000"], "out of range"),
        (["serve", "--smtps-listen", "[::1]"], "--smtps-listen"),
        (["serve", "--tls-cert", "cert.pem"], "--tls-cert needs --tls-key"),
        (["serve", "--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"],
         "cannot read TLS certificate /nonexistent/c.pem"),
        (["serve", "--proxy-protocol", "10.0.0.0/40"], "--proxy-protocol"),
        (["serve", "--trusted-networks", "x"], "--trusted-networks"),
        (["serve", "--max-size", "-1"], "--max-size: must not be negative"),
        (["serve", "--max-clients", "-3"], "--max-clients: must be at least 1"),
        (["serve", "--workers", "0"], "--workers: must be at least 1"),
        (["serve", "--idle-timeout", "-1"], "--idle-timeout"),
        (["serve", "--config", "/nonexistent/mailgate.toml"], "cannot read config file"),
        (["serve", "--bare-newline", "lenient"], "invalid choice: 'lenient'"),
        (["serve", "--log-format", "xml"], "invalid choice: 'xml'"),
        (["serve", "-v", "-q"], "not allowed with argument"),
        (["serve", "--sink", "--maildir", "x"], "not allowed with argument"),
        (["serve", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["serve", "--listen"], "expected one argument"),
        (["launch"], "invalid choice: 'launch'"),
        ([], "required: COMMAND"),
    ],
)  # fmt: skip
def test_errors_are_one_line_and_status_2(
    argv: list[str],
    needle: str,
    run_calls: list[tuple[ServerOptions, Reloader]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(argv) == 2
    assert_one_line_error(capsys, needle)
    assert run_calls == []


def test_file_errors_are_one_line(
    tmp_path: Path,
    run_calls: list[tuple[ServerOptions, Reloader]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "m.toml"
    path.write_text("[server]\nlisten = [\n  '127.0.0.1:25',\n  oops\n]\n")
    assert cli.main(["serve", "--config", str(path)]) == 2
    assert_one_line_error(capsys, str(path), "TOML syntax error", "line 4")

    path.write_text("[server]\nmax_sise = 1\n")
    assert cli.main(["serve", "--config", str(path)]) == 2
    assert_one_line_error(capsys, "unknown key 'max_sise'", "did you mean 'max_size'")


def serve_help(capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["serve", "--help"]) == 0
    # Join the wrapped lines so a phrase split by the formatter can still be found.
    return " ".join(capsys.readouterr().out.split())


def test_serve_help_mentions_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    text = serve_help(capsys)
    for key in KEYS:
        assert flag_name(key) in text, key
    for short in ("-v, --verbose", "-q, --quiet", "--config FILE"):
        assert short in text


def test_serve_help_gives_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    text = serve_help(capsys).split("options:", 1)[1]  # skip the usage summary
    defaults = ServerOptions()
    expected = {
        "--listen": "127.0.0.1:2525",
        "--workers": str(defaults.workers),
        "--hostname": "this machine's FQDN",
        "--state-dir": "./.mailgate",
        "--maildir": "./maildir",
        "--max-size": "26214400",
        "--max-recipients": "100",
        "--max-clients": "1000",
        "--max-clients-per-ip": "20",
        "--idle-timeout": "300",
        "--data-timeout": "180",
        "--close-timeout": "30",
        "--bare-newline": "reject",
        "--log-format": "text",
    }
    for flag, value in expected.items():
        # The flag's own help, up to the next flag.
        section = text.split(f" {flag} ", 1)[1].split(" --", 1)[0]
        assert f"(default: {value}" in section, flag

    # Every option, switches included, states its default.
    assert text.count("(default:") >= len(KEYS) + 1  # + --config


def test_main_help_lists_serve(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "serve" in out and "--version" in out


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    # The child must import this checkout even if run from elsewhere.
    src = str(Path(cli.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "mailgate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def test_python_m_mailgate_bad_listen_has_no_traceback() -> None:
    result = run_module("serve", "--listen", "bad")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("mailgate: error: --listen: 'bad' is not HOST:PORT")


def test_python_m_mailgate_version() -> None:
    result = run_module("--version")
    assert result.returncode == 0
    assert result.stdout.startswith(f"mailgate {__version__} (")
    assert result.stdout.rstrip().endswith(("(pure Python)", "(compiled with mypyc)"))
