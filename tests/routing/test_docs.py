"""docs/routing.md is true: its example configuration builds, its error lines are the
ones mailgate gives, and its `routes test` transcript is what routes_test prints."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mailgate.plugins.routing import RoutesConfigError, RouteTable, routes_test

DOC = Path(__file__).resolve().parents[2] / "docs" / "routing.md"


def blocks(language: str) -> list[str]:
    """The fenced blocks of the page in ``language`` ("" for plain ones), in order."""
    found: list[str] = []
    current: list[str] | None = None
    current_language = ""
    for line in DOC.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, current_language = [], line[3:].strip()
            else:
                if current_language == language:
                    found.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return found


def test_example_configuration_builds() -> None:
    [example] = blocks("toml")
    table = RouteTable.from_document(tomllib.loads(example), "mailgate.toml")
    assert [route.name for route in table.routes] == [
        "no-bounces-to-partners",
        "partners",
        "ours",
        "internet",
    ]
    assert table.match("postmaster@xn--bcher-kva.example").name == "ours"


def test_routes_test_transcript(tmp_path: Path) -> None:
    [example] = blocks("toml")
    config = tmp_path / "mailgate.toml"
    config.write_text(example, encoding="utf-8")
    transcript = next(b for b in blocks("") if b.startswith("$ mailgate routes test"))
    command, *expected = transcript.rstrip("\n").split("\n")
    words = shlex.split(command[2:])
    assert words[:5] == ["mailgate", "routes", "test", "--config", "mailgate.toml"]
    sender = words[words.index("--sender") + 1]
    client = words[words.index("--client") + 1]
    recipients = words[words.index("--authenticated") + 1 :]
    text, status = routes_test(config, recipients, sender, client, authenticated=True)
    assert status == 0
    assert text.split("\n") == expected


def _error_cases() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("#2: unknown key 'recipent'", {"recipent": ["*"], "action": "relay"}),
        ("#3: missing key 'to'", {"recipients": ["*"], "action": "forward"}),
        (
            "#1 to: only a forward route",
            {"recipients": ["*"], "action": "reject", "to": "smtp://h"},
        ),
        (
            "#4 reply: enhanced status",
            {"recipients": ["*"], "action": "reject", "reply": "550 4.7.1 x"},
        ),
    ]


@pytest.mark.parametrize(("prefix", "entry"), _error_cases())
def test_documented_error_lines(prefix: str, entry: dict[str, Any]) -> None:
    documented = [b for b in blocks("") if b.startswith("mailgate.toml [[routes]]")]
    [lines] = documented
    [line] = [
        line for line in lines.splitlines() if line.startswith(f"mailgate.toml [[routes]] {prefix}")
    ]
    number = int(prefix[1])
    entries: list[dict[str, Any]] = [{"recipients": ["*"], "action": "deliver"}] * (number - 1) + [
        entry
    ]
    with pytest.raises(RoutesConfigError) as raised:
        RouteTable.from_document({"routes": entries}, "mailgate.toml")
    assert str(raised.value) == line
