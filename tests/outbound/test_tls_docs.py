"""docs/outbound.md's "TLS policy and MTA-STS" section is true: its levels are the
levels mailgate knows, its example configuration builds into the policies it describes,
its error line is mailgate's, and its log lines have the fields of the real one."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from mailgate.plugins.routing import RoutesConfigError, RouteTable
from mailgate.queue.outbound import TLS_LEVELS
from mailgate.queue.outbound.tlspolicy import PolicyResolver
from mailgate.queue.settings import outbound_options
from mailgate.server.options import PolicySection

DOC = Path(__file__).resolve().parents[2] / "docs" / "outbound.md"
SECTION = "TLS policy and MTA-STS"


def section() -> str:
    text = DOC.read_text(encoding="utf-8")
    return text.split(f"\n## {SECTION}\n", 1)[1].split("\n## ", 1)[0]


def blocks(language: str) -> list[str]:
    found: list[str] = []
    current: list[str] | None = None
    current_language = ""
    for line in section().splitlines(keepends=True):
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


def test_the_table_lists_every_level() -> None:
    rows = re.findall(r"^\| `([a-z-]+)`", section(), re.MULTILINE)
    assert tuple(rows) == TLS_LEVELS


def test_the_example_configuration_builds_what_the_text_says() -> None:
    [example] = blocks("toml")
    document = tomllib.loads(example)
    outbound = outbound_options(
        [PolicySection("outbound", document["outbound"], None, "outbound.md [outbound]")],
        "mx.example.net",
    )
    assert outbound.tls_policy == "may" and outbound.mta_sts
    resolver = PolicyResolver(
        default=outbound.tls_policy, domains=dict(outbound.tls_policies), cafile=None
    )
    assert resolver.level_for("bank.example", None) == ("verify", "domain")
    assert resolver.level_for("mx.eu.bank.example", None) == ("verify", "domain")
    assert resolver.level_for("legacy-partner.example", None) == ("none", "domain")
    assert resolver.level_for("elsewhere.example", None) == ("may", "default")
    table = RouteTable.from_document(document, "mailgate.toml")
    partner = table.match("ann@partner.example")
    assert partner.tls == "verify"
    assert partner.destination == "forward:smtp://gw.partner.example:587?tls=verify"
    assert table.match("bob@gmail.com").destination == "relay:gmail.com"


def test_the_error_line_is_mailgates() -> None:
    quoted = re.search(
        r"`(mailgate\.toml \[\[routes\]\] #2 tls: [^`]+)`", section().replace("\n", " ")
    )
    assert quoted is not None
    document = {
        "routes": [
            {"recipients": ["*@a.example"], "action": "relay"},
            {"recipients": ["*"], "action": "relay", "tls": "always"},
        ]
    }
    with pytest.raises(RoutesConfigError) as raised:
        RouteTable.from_document(document, "mailgate.toml")
    assert str(raised.value) == quoted.group(1)


def test_the_log_lines_have_the_fields_of_the_real_one() -> None:
    engine_source = (
        Path(__file__).resolve().parents[2] / "src/mailgate/queue/outbound/engine.py"
    ).read_text(encoding="utf-8")
    [real] = re.findall(r'"%s: (attempt=%d [^"]+)"', engine_source)
    keys = re.findall(r"(\w+)=", real)
    [log] = [b for b in blocks("") if "attempt=" in b]
    for line in log.strip().splitlines():
        assert re.findall(r" (\w+)=", " " + line.split(": ", 1)[1].split(": <")[0]) == keys
