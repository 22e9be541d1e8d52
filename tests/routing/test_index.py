"""The indexed match gives exactly what trying every rule in order gives (hypothesis:
random tables and queries over a small world of addresses, so that they collide)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.plugins.policy import client_address
from mailgate.plugins.routing import DEFAULT_DECISION, RouteDecision, RouteTable
from mailgate.plugins.routing.patterns import AddressSet, split_address

DOMAINS = ["a.test", "b.a.test", "c.b.a.test", "Bücher.test", "xn--bcher-kva.test", "z.test"]
LOCALS = ["ann", "Bob", "x"]


def address_pattern(null: bool) -> st.SearchStrategy[str]:
    options = [
        st.just("*"),
        st.builds(lambda d: f"*@{d}", st.sampled_from(DOMAINS)),
        st.builds(lambda d: f"*@*.{d}", st.sampled_from(DOMAINS)),
        st.builds(lambda u, d: f"{u}@{d}", st.sampled_from(LOCALS), st.sampled_from(DOMAINS)),
    ]
    if null:
        options.append(st.just("<>"))
    return st.one_of(*options)


def rule() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "recipients": st.lists(address_pattern(False), min_size=1, max_size=3),
            "action": st.sampled_from(["deliver", "relay"]),
        },
        optional={
            "senders": st.lists(address_pattern(True), min_size=1, max_size=3),
            "clients": st.lists(
                st.sampled_from(
                    [
                        "10.0.0.0/8",
                        "10.1.0.0/16",
                        "::1/128",
                        "::ffff:10.1.0.0/112",
                        "0.0.0.0/0",
                        "10.1.2.3/32",
                    ]
                ),
                min_size=1,
                max_size=2,
            ),
            "authenticated": st.booleans(),
        },
    )


def address() -> st.SearchStrategy[str]:
    return st.builds(
        lambda u, d: f"{u}@{d}",
        st.sampled_from([*LOCALS, "ANN", "other"]),
        st.sampled_from([*DOMAINS, "B.A.TEST", "q.z.test"]),
    )


def linear(
    table: RouteTable, recipient: str, sender: str | None, client: str | None, auth: bool
) -> RouteDecision:
    """First match wins, the slow obvious way."""
    local, domain = split_address(recipient)
    parsed = (
        None if sender is None else (("", "") if sender in ("", "<>") else split_address(sender))
    )
    address = client_address(client) if client is not None else None
    for route in table.routes:
        if AddressSet(route.recipients).matching(local, domain) is None:
            continue
        if route.mismatch(parsed, address, auth) is None:
            return route.decision(domain)
    return DEFAULT_DECISION


@settings(max_examples=300, deadline=None)
@given(
    rules=st.lists(rule(), min_size=1, max_size=12),
    queries=st.lists(
        st.tuples(
            address(),
            st.one_of(st.none(), st.just(""), st.just("<>"), address()),
            st.one_of(
                st.none(),
                st.sampled_from(["10.1.2.3", "10.2.0.1", "::1", "::ffff:10.1.0.9", "192.0.2.1"]),
            ),
            st.booleans(),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_index_agrees_with_trying_every_rule(
    rules: list[dict[str, Any]], queries: list[tuple[str, str | None, str | None, bool]]
) -> None:
    table = RouteTable.from_document({"routes": rules}, "hypothesis")
    for query in queries:
        expected = linear(table, *query)
        got = table.match(*query)
        assert (got.index, got.destination) == (expected.index, expected.destination), query


def test_sender_index_walk_is_used_and_right() -> None:
    """Many '*' rules keyed by sender: the walk goes by sender, and still checks the
    recipient and the other conditions of each candidate."""
    entries: list[dict[str, Any]] = [
        {"recipients": ["*"], "senders": [f"*@s{i}.test"], "action": "relay"} for i in range(500)
    ]
    entries[250] = {"recipients": ["*@only.test"], "senders": ["*@s250.test"], "action": "deliver"}
    entries.append(
        {"recipients": ["*"], "senders": ["<>"], "authenticated": True, "action": "deliver"}
    )
    entries.append({"recipients": ["*"], "action": "reject"})
    table = RouteTable.from_document({"routes": entries}, "t")
    assert table.match("u@x.test", "a@s7.test").index == 8
    assert table.match("u@x.test", "a@s250.test").index == 502  # recipient not only.test
    assert table.match("u@only.test", "a@s250.test").index == 251
    assert table.match("u@x.test", "<>", authenticated=True).index == 501
    assert table.match("u@x.test", "<>").index == 502
    assert table.match("u@x.test", None).index == 502


def test_client_index_walk() -> None:
    """Many '*' rules keyed by client network: found by prefix, v4-mapped clients too."""
    entries: list[dict[str, Any]] = [
        {"recipients": ["*"], "clients": [f"10.{i // 256}.{i % 256}.0/24"], "action": "relay"}
        for i in range(2000)
    ]
    entries.append(
        {"recipients": ["*@x.test"], "clients": ["0.0.0.0/0", "::/0"], "action": "deliver"}
    )
    entries.append({"recipients": ["*"], "action": "reject"})
    table = RouteTable.from_document({"routes": entries}, "t")
    assert table.match("u@y.test", client_ip="10.6.100.9").index == 6 * 256 + 100 + 1
    assert table.match("u@y.test", client_ip="::ffff:10.0.3.1").index == 4
    assert table.match("u@x.test", client_ip="192.0.2.1").index == 2001
    assert table.match("u@x.test", client_ip="2001:db8::1").index == 2001
    assert table.match("u@y.test", client_ip="192.0.2.1").index == 2002
    assert table.match("u@y.test").index == 2002
