"""A honeypot sends nothing onward: a file with [[routes]], [queue] or [outbound] is
refused, naming the table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mailgate import cli


@pytest.mark.parametrize(
    ("table", "shown"),
    [
        ("[[routes]]\nrecipients = ['*']\naction = 'relay'\n", r"\[\[routes\]\] #1"),
        ("[queue]\nlifetime = '1d'\n", r"\[queue\]"),
        ("[outbound]\nport = 2525\n", r"\[outbound\]"),
    ],
)
@pytest.mark.parametrize("command", ["honeypot", "serve"])
def test_onward_tables_are_refused_in_honeypot_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, shown: str, command: str
) -> None:
    path = tmp_path / "honeypot.toml"
    path.write_text(f"[server]\nmode = 'honeypot'\n[honeypot]\ndata_dir = 'd'\n{table}")
    assert cli.main([command, "--config", str(path)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert re.search(
        shown + r": not for honeypot mode: a honeypot never sends mail onward", line
    ), line
