"""Routing rules: reading [[routes]] tables (with errors naming table and key) and
matching recipients, first match wins, table-driven."""

from __future__ import annotations

import ipaddress
import time
import tomllib
from typing import Any

import pytest

from mailgate.plugins.routing import (
    DEFAULT_DECISION,
    Action,
    ForwardTarget,
    RejectReply,
    RoutesConfigError,
    RouteTable,
    describe,
)

CONFIG = """
[[routes]]
name = "blocked"
recipients = ["*@blocked.example"]
action = "reject"
reply = "550 5.7.1 No mail for blocked.example"

[[routes]]
recipients = ["CEO@Corp.Example"]
senders = ["<>"]
action = "reject"
reply = "550 5.7.1 No bounces for the CEO"

[[routes]]
name = "local"
description = "our own mailboxes"
recipients = ["*@corp.example"]
action = "deliver"

[[routes]]
name = "partners"
recipients = ["*@*.partner.example", "*@partner.example"]
authenticated = true
action = "forward"
to = "smtp://Smarthost.Test:587"
auth = "relay:s3cret"

[[routes]]
recipients = ["*@bücher.example"]
clients = ["10.0.0.0/8", "2001:db8::/32"]
action = "relay"

[[routes]]
recipients = ["*@lmtp.example"]
clients = ["::ffff:192.0.2.0/120"]
action = "forward"
to = "lmtp://[2001:db8::25]:24"

[[routes]]
recipients = ["*"]
senders = ["*@corp.example", "*@*.corp.example"]
action = "relay"

[[routes]]
recipients = ["*"]
action = "reject"
reply = "450 4.7.1 Try again later"
"""


def table(text: str = CONFIG) -> RouteTable:
    return RouteTable.from_document(tomllib.loads(text), "mailgate.toml")


# (recipient, sender, client, authenticated) -> (rule index, action, destination)
CASES: list[tuple[tuple[str, str | None, str | None, bool], tuple[int | None, str, str]]] = [
    (
        ("x@blocked.example", "a@corp.example", None, True),
        (1, "reject", "550 5.7.1 No mail for blocked.example"),
    ),
    (
        ("X@BLOCKED.EXAMPLE.", None, None, False),
        (1, "reject", "550 5.7.1 No mail for blocked.example"),
    ),
    # Rule 2 needs the null sender; "" and "<>" both are.
    (("ceo@corp.example", "", None, False), (2, "reject", "550 5.7.1 No bounces for the CEO")),
    (("Ceo@CORP.example", "<>", None, False), (2, "reject", "550 5.7.1 No bounces for the CEO")),
    (("ceo@corp.example", "someone@else.test", None, False), (3, "deliver", "deliver")),
    (("ceo@corp.example", None, None, False), (3, "deliver", "deliver")),  # sender unknown
    (("anyone@corp.example", "", None, False), (3, "deliver", "deliver")),
    # *@*.partner.example is subdomains; *@partner.example the domain itself.
    (
        ("a@partner.example", "x@y.test", None, True),
        (4, "forward", "forward:smtp://relay@smarthost.test:587"),
    ),
    (
        ("a@deep.sub.partner.example", "x@y.test", None, True),
        (4, "forward", "forward:smtp://relay@smarthost.test:587"),
    ),
    # Not authenticated: rule 4 is passed over, and so is rule 7 (sender not corp): 8.
    (("a@partner.example", "x@y.test", None, False), (8, "reject", "450 4.7.1 Try again later")),
    (("a@notpartner.example", "x@y.test", None, True), (8, "reject", "450 4.7.1 Try again later")),
    # IDNA: the U-label and A-label spellings are one domain; relay keys use A-labels.
    (("u@bücher.example", None, "10.1.2.3", False), (5, "relay", "relay:xn--bcher-kva.example")),
    (
        ("u@XN--BCHER-KVA.example", None, "10.1.2.3", False),
        (5, "relay", "relay:xn--bcher-kva.example"),
    ),
    (
        ("u@bücher.example", None, "::ffff:10.9.9.9", False),
        (5, "relay", "relay:xn--bcher-kva.example"),
    ),
    (
        ("u@bücher.example", None, "2001:db8:1::7", False),
        (5, "relay", "relay:xn--bcher-kva.example"),
    ),
    (("u@bücher.example", None, "192.0.2.1", False), (8, "reject", "450 4.7.1 Try again later")),
    (("u@bücher.example", None, None, False), (8, "reject", "450 4.7.1 Try again later")),
    # A v4-mapped network matches plain IPv4 clients, and v4-mapped ones.
    (
        ("m@lmtp.example", None, "192.0.2.200", False),
        (6, "forward", "forward:lmtp://[2001:db8::25]:24"),
    ),
    (
        ("m@lmtp.example", None, "::ffff:192.0.2.9", False),
        (6, "forward", "forward:lmtp://[2001:db8::25]:24"),
    ),
    (("m@lmtp.example", None, "198.51.100.1", False), (8, "reject", "450 4.7.1 Try again later")),
    # Rule 7: any recipient from corp (or its subdomains) is relayed to the recipient's MX.
    (
        ("friend@gmail.test", "boss@corp.example", "203.0.113.5", False),
        (7, "relay", "relay:gmail.test"),
    ),
    (
        ("friend@Gmail.TEST", "<boss@Mail.Corp.Example>", None, False),
        (7, "relay", "relay:gmail.test"),
    ),
    (
        ("friend@gmail.test", "boss@notcorp.example", None, False),
        (8, "reject", "450 4.7.1 Try again later"),
    ),
    (("friend@gmail.test", "", None, False), (8, "reject", "450 4.7.1 Try again later")),
    # The bare postmaster (RFC 5321 4.5.1) has no domain: always local.
    (("postmaster", None, None, False), (None, "deliver", "deliver")),
]


@pytest.mark.parametrize(
    ("given", "expected"), CASES, ids=[f"{c[0][0]}|{c[0][1]}|{c[0][2]}|{c[0][3]}" for c in CASES]
)
def test_first_matching_rule_decides(
    given: tuple[str, str | None, str | None, bool], expected: tuple[int | None, str, str]
) -> None:
    decision = table().match(*given)
    assert (decision.index, decision.action.value, decision.destination) == expected


def test_decision_carries_rule_details() -> None:
    routes = table()
    decision = routes.match("a@partner.example", "x@y.test", "127.0.0.1", authenticated=True)
    assert decision.name == "partners" and decision.description is None
    assert decision.action is Action.FORWARD
    target = decision.forward
    assert target is not None
    assert (target.scheme, target.host, target.port) == ("smtp", "smarthost.test", 587)
    assert (target.username, target.password, target.starttls) == ("relay", "s3cret", "auto")
    assert (target.to, target.auth) == ("smtp://Smarthost.Test:587", "relay:s3cret")
    assert "s3cret" not in repr(target) and "s3cret" not in target.url
    local = routes.match("a@corp.example")
    assert (local.name, local.description) == ("local", "our own mailboxes")
    assert local.forward is None and local.reply is None and local.domain is None
    relay = routes.match("f@gmail.test", "b@corp.example")
    assert relay.domain == "gmail.test"
    reject = routes.match("x@blocked.example")
    assert reject.reply == RejectReply(550, "5.7.1", "No mail for blocked.example")
    assert reject.reply.permanent
    assert routes.match("f@gmail.test").reply == RejectReply(450, "4.7.1", "Try again later")
    assert routes.routes[0].source == "mailgate.toml [[routes]] #1"


def test_without_routes_everything_is_delivered_locally() -> None:
    empty = table("[server]\nhostname = 'mx.test'\n")
    assert not empty and len(empty) == 0
    assert empty.match("anyone@anywhere.test", "", "192.0.2.1", True) is DEFAULT_DECISION
    assert DEFAULT_DECISION.action is Action.DELIVER and DEFAULT_DECISION.destination == "deliver"
    assert DEFAULT_DECISION.index is None


def test_no_matching_rule_delivers_locally() -> None:
    routes = table('[[routes]]\nrecipients = ["*@a.test"]\naction = "relay"\n')
    assert routes.match("x@b.test") is DEFAULT_DECISION
    assert routes.match("x@a.test").destination == "relay:a.test"
    assert routes.match("x@sub.a.test") is DEFAULT_DECISION


def test_exact_address_pattern_is_case_insensitive_and_nfc() -> None:
    routes = table('[[routes]]\nrecipients = ["José@Ex.test", "<ann@ex.test>"]\naction = "relay"\n')
    assert routes.match("jos\u0065\u0301@ex.test").index == 1  # decomposed é
    assert routes.match("JOSÉ@EX.TEST").index == 1
    assert routes.match("jose@ex.test").index is None


def test_reject_reply_forms() -> None:
    assert RejectReply.parse("554") == RejectReply(554, None, "Recipient address rejected")
    assert RejectReply.parse("450 try later") == RejectReply(450, None, "try later")
    assert RejectReply.parse(" 550 5.1.1  no such user ") == RejectReply(
        550, "5.1.1", "no such user"
    )
    assert str(RejectReply.parse("421 4.3.2 bye")) == "421 4.3.2 bye"
    for bad in (
        "250 ok",
        "600 x",
        "55 x",
        "550 4.7.1 mismatch",
        "5501 x",
        "550 5.7.1 caf\u00e9",
        "",
    ):
        with pytest.raises(ValueError):
            RejectReply.parse(bad)


def test_forward_targets() -> None:
    assert ForwardTarget.parse("smtp://h.test").port == 25
    assert ForwardTarget.parse("smtps://h.test").port == 465
    assert ForwardTarget.parse("lmtp://h.test").port == 24
    assert ForwardTarget.parse("SMTP://H.Test:2525/").url == "smtp://h.test:2525"
    assert ForwardTarget.parse("smtp://[::1]:25").url == "smtp://[::1]:25"
    target = ForwardTarget.parse("lmtp://127.0.0.1:24", "u:p:with:colons")
    assert (target.username, target.password) == ("u", "p:with:colons")
    assert (target.to, target.auth) == ("lmtp://127.0.0.1:24", "u:p:with:colons")
    # The forward delivery's URL grammar: credentials in the URL, starttls and cafile.
    target = ForwardTarget.parse("smtp://relay%40corp:s%3Acret@h.test:587?starttls=require")
    assert (target.username, target.password, target.starttls) == (
        "relay@corp",
        "s:cret",
        "require",
    )
    assert target.url == "smtp://relay@corp@h.test:587?starttls=require"
    assert "cret" not in repr(target)
    target = ForwardTarget.parse("smtps://h.test?cafile=/etc/ca.pem")
    assert (target.starttls, target.cafile) == ("no", "/etc/ca.pem")
    for bad, auth in [
        ("http://h.test", None),
        ("smtp://h.test/path", None),
        ("smtp://", None),
        ("smtp://h.test:99999", None),
        ("smtp://h.test:0", None),
        ("smtp://h.test?verify=no", None),
        ("smtp://h.test?starttls=maybe", None),
        ("smtps://h.test?starttls=require", None),
        ("smtp://:pw@h.test", None),
        ("smtp://u:p@h.test", "u:p"),
        ("smtp://h.test", "nopassword"),
        ("smtp://h.test", ":pw"),
    ]:
        with pytest.raises(ValueError) as raised:
            ForwardTarget.parse(bad, auth)
        assert "pw@" not in str(raised.value) and ":p@" not in str(raised.value)


def test_forward_targets_by_key_carry_the_credentials() -> None:
    targets = table().forward_targets()
    assert set(targets) == {
        "forward:smtp://relay@smarthost.test:587",
        "forward:lmtp://[2001:db8::25]:24",
    }
    assert targets["forward:smtp://relay@smarthost.test:587"].password == "s3cret"


def rules(*entries: dict[str, Any]) -> RouteTable:
    return RouteTable.from_document({"routes": list(entries)}, "mailgate.toml")


ERRORS: list[tuple[list[Any], str]] = [
    (
        [{"recipients": ["*"], "action": "relay"}, {"recipent": ["*"], "action": "relay"}],
        "mailgate.toml [[routes]] #2: unknown key 'recipent' (did you mean 'recipients'?)",
    ),
    (
        [{"recipients": ["*"], "action": "forward"}],
        "mailgate.toml [[routes]] #1: missing key 'to' (a forward route needs to = \"smtp://host:port\")",
    ),
    (
        [{"recipients": ["*"], "action": "reject", "to": "smtp://h.test"}],
        "mailgate.toml [[routes]] #1 to: only a forward route takes 'to' (this one is reject)",
    ),
    (
        [{"recipients": ["*"], "action": "relay", "auth": "a:b"}],
        "mailgate.toml [[routes]] #1 auth: only a forward route takes 'auth' (this one is relay)",
    ),
    (
        [{"recipients": ["*"], "action": "deliver", "reply": "550 no"}],
        "mailgate.toml [[routes]] #1 reply: only a reject route takes 'reply' (this one is deliver)",
    ),
    (
        [{"recipients": ["*"], "action": "reject", "reply": "250 fine"}],
        "mailgate.toml [[routes]] #1 reply: '250 fine' is not a refusal reply",
    ),
    (
        [{"recipients": ["*"], "action": "reject", "reply": "550 4.7.1 x"}],
        "#1 reply: enhanced status 4.7.1 does not go with reply code 550",
    ),
    (
        [{"recipients": ["*"]}],
        "mailgate.toml [[routes]] #1: missing key 'action' (one of deliver, relay, forward, reject)",
    ),
    (
        [{"recipients": ["*"], "action": "bounce"}],
        "mailgate.toml [[routes]] #1 action: 'bounce' is not one of deliver, relay, forward, reject",
    ),
    ([{"action": "relay"}], "mailgate.toml [[routes]] #1: missing key 'recipients'"),
    ([{"recipients": [], "action": "relay"}], "#1 recipients: an empty list matches nothing"),
    (
        [{"recipients": ["*"], "senders": [], "action": "relay"}],
        "#1 senders: an empty list matches nothing",
    ),
    (
        [{"recipients": ["user@*"], "action": "relay"}],
        "#1 recipients: 'user@*': '*' is not a domain",
    ),
    (
        [{"recipients": ["us*er@x.test"], "action": "relay"}],
        "#1 recipients: 'us*er@x.test': the local part",
    ),
    (
        [{"recipients": ["a@*.x.test"], "action": "relay"}],
        "#1 recipients: 'a@*.x.test': a *.domain pattern is for whole domains",
    ),
    ([{"recipients": ["*@x.*.test"], "action": "relay"}], "#1 recipients: '*@x.*.test'"),
    (
        [{"recipients": ["*@*.[192.0.2.1]"], "action": "relay"}],
        "#1 recipients: '*@*.[192.0.2.1]': '[192.0.2.1]' is not a domain",
    ),
    (
        [{"recipients": ["<>"], "action": "relay"}],
        "#1 recipients: '<>' (the null sender) is a pattern for senders only",
    ),
    (
        [{"recipients": ["nodomain"], "action": "relay"}],
        "#1 recipients: 'nodomain' is not a pattern",
    ),
    (
        [{"recipients": ["*"], "senders": ["bad pattern"], "action": "relay"}],
        "#1 senders: 'bad pattern' is not a pattern (user@domain, *@domain, *@*.domain or * or <>)",
    ),
    (
        [{"recipients": ["*"], "clients": ["10.0.0.0/33"], "action": "relay"}],
        "#1 clients: '10.0.0.0/33' is not an IP network",
    ),
    (
        [{"recipients": ["*"], "authenticated": "yes", "action": "relay"}],
        "#1 authenticated: expected true or false",
    ),
    (
        [{"recipients": "*", "action": "forward", "to": "smtp://h.test", "auth": "nopw"}],
        '#1 auth: auth must be "user:password"',
    ),
    (
        [{"recipients": ["*"], "action": "forward", "to": "smtp://u:secret@h.test?x=1"}],
        "#1 to: 'smtp://u:***@h.test?x=1': unknown option 'x' (starttls, cafile, tls)",
    ),
    (
        [{"recipients": ["*"], "action": "relay"}, "not a table"],
        "mailgate.toml [[routes]] #2: must be a table",
    ),
    (
        [{"recipients": ["*"], "action": "relay", "tls": "always"}],
        "#1 tls: 'always' is not one of none, may, encrypt, verify, dane, dane-only, mta-sts",
    ),
    (
        [{"recipients": ["*"], "action": "deliver", "tls": "verify"}],
        "#1 tls: only a relay or forward route takes 'tls' (this one is deliver)",
    ),
    (
        [
            {
                "recipients": ["*"],
                "action": "forward",
                "to": "smtp://h.test?tls=may",
                "tls": "verify",
            }
        ],
        "#1 tls: the URL in 'to' has a tls= option already",
    ),
    (
        [{"recipients": ["*"], "action": "forward", "to": "smtps://h.test?tls=none"}],
        "smtps:// is TLS already; tls=none cannot be",
    ),
]


def test_a_route_gives_its_mail_a_tls_policy_in_the_destination_key() -> None:
    table = RouteTable.from_document(
        {
            "routes": [
                {"recipients": ["*@bank.example"], "action": "relay", "tls": "Verify"},
                {
                    "recipients": ["*@partner.example"],
                    "action": "forward",
                    "to": "smtp://gw.partner.example:587?starttls=require",
                    "tls": "dane",
                },
                {"recipients": ["*"], "action": "relay"},
            ]
        },
        "mailgate.toml",
    )
    bank = table.match("a@bank.example")
    assert (bank.destination, bank.domain, bank.tls) == (
        "relay:bank.example?tls=verify",
        "bank.example",
        "verify",
    )
    partner = table.match("b@partner.example")
    assert partner.destination == (
        "forward:smtp://gw.partner.example:587?starttls=require&tls=dane"
    )
    assert partner.forward is not None and partner.forward.tls == "dane"
    assert partner.tls == "dane"
    other = table.match("c@other.example")
    assert (other.destination, other.tls) == ("relay:other.example", None)


@pytest.mark.parametrize(("entries", "message"), ERRORS)
def test_errors_name_the_table_and_key(entries: list[Any], message: str) -> None:
    with pytest.raises(RoutesConfigError) as raised:
        RouteTable.from_document({"routes": entries}, "mailgate.toml")
    text = str(raised.value)
    assert message in text
    assert "\n" not in text


def test_routes_must_be_an_array_of_tables() -> None:
    with pytest.raises(RoutesConfigError, match=r"routes must be an array of tables"):
        RouteTable.from_document(tomllib.loads('[routes]\naction = "relay"\n'), "m.toml")


def test_a_string_is_a_one_pattern_list() -> None:
    routes = rules({"recipients": "*@a.test", "senders": "<>", "action": "relay"})
    assert routes.match("x@a.test", "").index == 1
    assert routes.match("x@a.test", "s@b.test").index is None


def test_star_sender_matches_the_null_sender_too() -> None:
    routes = rules({"recipients": ["*"], "senders": ["*"], "action": "relay"})
    assert routes.match("x@a.test", "<>").index == 1
    assert routes.match("x@a.test", "s@b.test").index == 1
    assert routes.match("x@a.test", None).index is None  # unknown sender: no rule with senders


def test_authenticated_false_is_for_anonymous_clients_only() -> None:
    routes = rules({"recipients": ["*"], "authenticated": False, "action": "relay"})
    assert routes.match("x@a.test", authenticated=False).index == 1
    assert routes.match("x@a.test", authenticated=True).index is None


def test_client_address_objects_and_garbage() -> None:
    routes = rules(
        {"recipients": ["*"], "clients": "10.0.0.0/8, 192.168.0.0/16", "action": "relay"}
    )
    assert routes.match("x@a.test", client_ip=ipaddress.ip_address("10.1.1.1")).index == 1
    assert routes.match("x@a.test", client_ip="192.168.4.4").index == 1
    assert routes.match("x@a.test", client_ip="not an ip").index is None


def test_address_literal_domains() -> None:
    routes = rules({"recipients": ["*@[192.0.2.1]"], "action": "relay"})
    assert routes.match("x@[192.0.2.1]").destination == "relay:[192.0.2.1]"


def test_rule_order_wins_over_pattern_specificity() -> None:
    """First match wins: a '*' rule before an exact address rule takes the address too."""
    routes = rules(
        {"recipients": ["*"], "senders": ["*@corp.test"], "action": "relay"},
        {"recipients": ["ann@a.test"], "action": "deliver"},
        {"recipients": ["*@a.test"], "action": "reject"},
    )
    assert routes.match("ann@a.test", "b@corp.test").index == 1
    assert routes.match("ann@a.test", "b@else.test").index == 2
    assert routes.match("bob@a.test", "b@else.test").index == 3
    assert (
        routes.match("bob@a.test", "b@else.test").destination
        == "550 5.7.1 Recipient address rejected"
    )


def test_ten_thousand_rules_find_the_right_one() -> None:
    """10,000 domain rules, a catch-all with a condition at the top and the match near the
    end: the index reads only the candidates, so a match stays cheap (the timing bound is
    loose on purpose: the machine is shared; bench/routing_match.py measures)."""
    entries: list[dict[str, Any]] = [
        {"recipients": ["*"], "authenticated": True, "action": "relay"}
    ]
    for n in range(10_000):
        entries.append({"recipients": [f"*@d{n}.test", f"u{n}@x.test"], "action": "relay"})
    entries.append({"recipients": ["*"], "action": "reject"})
    routes = rules(*entries)
    assert routes.match("a@d9999.test").index == 10_001
    assert routes.match("u5000@x.test").destination == "relay:x.test"
    assert routes.match("a@sub.d5.test").index == 10_002
    assert routes.match("a@d5.test", authenticated=True).index == 1
    started = time.perf_counter()
    for _ in range(1000):
        routes.match("a@d9999.test", "s@b.test", "192.0.2.1")
    assert (time.perf_counter() - started) / 1000 < 0.001


def test_routes_test_names_a_relay_rules_tls_policy() -> None:
    table = RouteTable.from_document(
        {
            "routes": [
                {"recipients": ["*@bank.example"], "action": "relay", "tls": "verify"},
                {"recipients": ["*"], "action": "relay"},
            ]
        },
        "mailgate.toml",
    )
    assert describe(table.match("a@bank.example")) == (
        "relay to the MX of bank.example (TLS policy verify)"
    )
    assert describe(table.match("a@other.example")) == "relay to the MX of other.example"
