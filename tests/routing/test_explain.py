"""`mailgate routes test`: the text and exit status of routes_test, from a real file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.plugins.routing import load_routes, routes_test
from mailgate.plugins.routing.explain import EXIT_BAD_INPUT, EXIT_CONFIG, EXIT_OK

CONFIG = """
[server]
hostname = "mx.corp.example"

[[routes]]
name = "block"
recipients = ["*@partner.example"]
senders = ["<>"]
action = "reject"
reply = "550 5.7.1 No bounces to partners"

[[routes]]
name = "partners"
description = "mail for partners goes through their gateway"
recipients = ["*@partner.example"]
senders = ["*@corp.example"]
clients = ["10.0.0.0/8"]
authenticated = true
action = "forward"
to = "smtp://mx.partner.example"
auth = "gateway:secret"

[[routes]]
recipients = ["*"]
action = "relay"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "mailgate.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


def test_the_matching_rule_and_why(config: Path) -> None:
    text, status = routes_test(
        config, ["bob@partner.example"], "a@corp.example", "10.1.1.1", authenticated=True
    )
    assert status == EXIT_OK
    assert text.splitlines() == [
        "sender <a@corp.example>, client 10.1.1.1, authenticated",
        'bob@partner.example: rule #2 "partners" -> forward to smtp://gateway@mx.partner.example:25',
        "    mail for partners goes through their gateway",
        "    matched by recipients '*@partner.example', senders '*@corp.example', "
        "clients '10.0.0.0/8', authenticated = true",
        '    rule #1 "block" was passed over: the sender is not in senders',
    ]
    assert "secret" not in text


def test_passed_over_rules_say_why_and_each_recipient_has_a_line(config: Path) -> None:
    text, status = routes_test(
        config, ["bob@partner.example", "x@bücher.example", "postmaster"], "a@corp.example"
    )
    assert status == EXIT_OK
    lines = text.splitlines()
    assert lines[0] == (
        "sender <a@corp.example>, no client address (rules with clients do not match), "
        "not authenticated"
    )
    assert lines[1] == "bob@partner.example: rule #3 -> relay to the MX of partner.example"
    assert lines[2] == "    matched by recipients '*'"
    assert '    rule #2 "partners" was passed over: only for authenticated clients' in lines
    assert "x@bücher.example: rule #3 -> relay to the MX of xn--bcher-kva.example" in lines
    assert lines[-1] == (
        "postmaster: an address without a domain is always local "
        "-> deliver locally (the configured deliveries)"
    )


def test_null_sender_and_reject(config: Path) -> None:
    text, status = routes_test(config, ["<ann@partner.example>"], "<>")
    assert status == EXIT_OK
    assert text.splitlines()[:3] == [
        "sender <> (the null sender), no client address (rules with clients do not match), "
        "not authenticated",
        'ann@partner.example: rule #1 "block" -> reject at RCPT with 550 5.7.1 No bounces to partners',
        "    matched by recipients '*@partner.example', senders '<>'",
    ]


def test_without_routes(tmp_path: Path) -> None:
    path = tmp_path / "plain.toml"
    path.write_text('[server]\nhostname = "mx.test"\n', encoding="utf-8")
    text, status = routes_test(path, ["a@b.test"])
    assert status == EXIT_OK
    assert text.splitlines()[1] == (
        "a@b.test: no [[routes]] -> deliver locally (the configured deliveries)"
    )
    assert not load_routes(path)


def test_bad_input_exits_1(config: Path) -> None:
    text, status = routes_test(config, ["not an address", "ok@x.test"], "bad sender", "300.1.1.1")
    assert status == EXIT_BAD_INPUT
    lines = text.splitlines()
    assert all(line.startswith("mailgate: error: ") for line in lines)
    assert any("--sender 'bad sender' is not an address" in line for line in lines)
    assert any("--client '300.1.1.1' is not an IP address" in line for line in lines)
    assert any("'not an address' is not an address" in line for line in lines)
    assert routes_test(config, [])[1] == EXIT_BAD_INPUT


def test_config_errors_exit_2(tmp_path: Path) -> None:
    missing = routes_test(tmp_path / "nope.toml", ["a@b.test"])
    assert missing[1] == EXIT_CONFIG and "cannot read" in missing[0]
    broken = tmp_path / "broken.toml"
    broken.write_text("[[routes]\n", encoding="utf-8")
    text, status = routes_test(broken, ["a@b.test"])
    assert status == EXIT_CONFIG and "not valid TOML" in text
    typo = tmp_path / "typo.toml"
    typo.write_text('[[routes]]\nrecipent = ["*"]\naction = "relay"\n', encoding="utf-8")
    text, status = routes_test(typo, ["a@b.test"])
    assert status == EXIT_CONFIG
    assert text == (
        f"mailgate: error: {typo} [[routes]] #1: unknown key 'recipent' "
        "(did you mean 'recipients'?)"
    )
