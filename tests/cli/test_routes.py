"""``mailgate routes test``: the command line over routing's routes_test, its output and
its exit statuses."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from tests.cli.conftest import mailgate_command, mailgate_env

from mailgate import cli


def main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(["routes", "test", *args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return status, captured.out, captured.err


def test_each_recipient_gets_its_rule_and_action(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = main(
        capsys,
        "--config",
        str(config),
        "--sender",
        "ann@corp.example",
        "--client",
        "10.1.2.3",
        "--authenticated",
        "dave@partner.example",
        "bob@example.net",
        "x@blocked.example",
    )
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "sender <ann@corp.example>, client 10.1.2.3, authenticated"
    assert 'dave@partner.example: rule #4 "partners" -> forward to smtp://127.0.0.1:2525' in lines
    assert 'bob@example.net: rule #5 "internet" -> relay to the MX of example.net' in lines
    assert (
        'x@blocked.example: rule #2 "blocked" -> reject at RCPT with '
        "550 5.7.1 We do not send there" in lines
    )
    assert "    matched by recipients '*'" in lines


def test_without_sender_or_client(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = main(capsys, "--config", str(config), "someone@corp.example")
    assert status == 0
    assert out.splitlines()[0] == (
        "no sender given (rules with senders do not match), "
        "no client address (rules with clients do not match), not authenticated"
    )
    assert 'someone@corp.example: rule #1 "ours" -> deliver locally' in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["not an address"], "'not an address' is not an address"),
        (["--client", "10.0.0.300", "a@example.net"], "--client '10.0.0.300' is not an IP address"),
        ([], "no recipient given"),
    ],
)
def test_bad_input_exits_1(
    config: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    status, out, err = main(capsys, "--config", str(config), *args)
    assert (status, out) == (1, "")
    assert needle in err and "Traceback" not in err


def test_a_wrong_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.toml"
    path.write_text('[[routes]]\nrecipent = ["*"]\naction = "relay"\n')
    status, out, err = main(capsys, "--config", str(path), "a@example.net")
    assert (status, out) == (2, "")
    assert len(err.splitlines()) == 1 and "unknown key 'recipent'" in err
    status, _, err = main(capsys, "--config", str(tmp_path / "none.toml"), "a@example.net")
    assert status == 2 and "cannot read" in err
    # --config is required.
    status, _, err = main(capsys, "a@example.net")
    assert status == 2 and "--config" in err and len(err.splitlines()) == 1


def test_as_a_process(config: Path) -> None:
    result = subprocess.run(
        mailgate_command("routes", "test", "--config", str(config), "a@later.example"),
        env=mailgate_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert 'rule #3 "later" -> reject at RCPT with 450 4.7.1 Not today' in result.stdout
