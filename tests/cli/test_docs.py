"""docs/operations.md shows real output: its `queue list` and `queue stats` examples are
what the commands print for the queue of tests/cli/conftest.py, and its exit status
tables name the statuses the commands use."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tests.cli.conftest import Queue

from mailgate import cli
from mailgate.cli import queue as queue_cli
from mailgate.cli import sendmail

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def example(command: str) -> str:
    """The output under ``$ mailgate <command> --config mailgate.toml`` in the doc."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(
        rf"```\n\$ mailgate {re.escape(command)} --config mailgate.toml\n(.*?)```", text, re.S
    )
    assert match is not None, command
    return match.group(1)


def normalized(text: str) -> str:
    text = re.sub(r"\b[0-9A-HJKMNP-TV-Z]{16}\b", "ID", text)
    text = re.sub(r"\b\d+s old\b", "Ns old", text)
    return re.sub(r"next attempt in [45]m", "next attempt in 5m", text)


@pytest.mark.parametrize("command", ["queue list", "queue stats"])
def test_examples_are_real_output(
    queue: Queue, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    assert cli.main([*command.split(), "--config", str(queue.config)]) == 0
    assert normalized(capsys.readouterr().out) == normalized(example(command))


def test_exit_status_tables() -> None:
    text = DOC.read_text(encoding="utf-8")
    for status in (
        queue_cli.EXIT_OK,
        queue_cli.EXIT_UNKNOWN_ID,
        queue_cli.EXIT_CONFIG,
        queue_cli.EXIT_QUEUE,
    ):
        assert f"\n| {status} | " in text
    for name in (
        "EX_USAGE",
        "EX_DATAERR",
        "EX_NOUSER",
        "EX_UNAVAILABLE",
        "EX_TEMPFAIL",
        "EX_CONFIG",
    ):
        assert f"| {getattr(sendmail, name)} ({name}) |" in text
