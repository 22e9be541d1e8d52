"""Options the policy plugins take so that a mode can word and quiet them without
subclassing them: Lists(client_refusal=), RateLimits(connect_refusal=) and the relay
table's warn_open_relay."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from mailgate.hooks import Address, Envelope, Reject, Session, TempFail
from mailgate.plugins import relay
from mailgate.plugins.lists import Lists
from mailgate.plugins.policy import PolicyConfigError, PolicyEnv, refusal
from mailgate.plugins.rate_limits import RateLimits
from mailgate.protocol import Reply
from mailgate.server.options import PolicySection, ServerOptions


def session(peer: str = "192.0.2.1") -> Session:
    return Session(id="t", peer_host=peer, peer_port=1, local_host="127.0.0.1", local_port=25)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def persona(code: int, text: str) -> Any:
    """A refusal text like a persona's: naming the client."""

    def reply(session: Session) -> Reply:
        return Reply(code, None, (f"{text} [{session.peer_host}]",))

    return reply


# --- refusal() ----------------------------------------------------------------------------


def test_refusal_is_tempfail_below_500_and_reject_above() -> None:
    temp = refusal(Reply(421, "4.7.0", ("busy",)), disconnect=True)
    assert isinstance(temp, TempFail) and temp.disconnect and temp.enhanced == "4.7.0"
    perm = refusal(Reply(554, None, ("go away",)))
    assert isinstance(perm, Reject) and not perm.disconnect and perm.text == "go away"


# --- Lists(client_refusal=) ---------------------------------------------------------------


def test_lists_refuse_a_blocked_client_with_the_given_reply() -> None:
    lists = Lists(block_networks=["192.0.2.0/24"], client_refusal=persona(550, "No thanks"))
    with pytest.raises(Reject) as caught:
        run(lists.on_connect(session()))
    assert caught.value.code == 550
    assert caught.value.text == "No thanks [192.0.2.1]"
    assert caught.value.disconnect


def test_lists_client_refusal_may_be_a_tempfail() -> None:
    lists = Lists(block_networks=["192.0.2.0/24"], client_refusal=persona(421, "Later"))
    with pytest.raises(TempFail) as caught:
        run(lists.on_connect(session()))
    assert caught.value.code == 421 and caught.value.disconnect


def test_lists_without_client_refusal_keep_their_own_text() -> None:
    lists = Lists(block_networks=["192.0.2.0/24"])
    with pytest.raises(Reject) as caught:
        run(lists.on_connect(session()))
    assert caught.value.code == 554 and "Client host [192.0.2.1] rejected" in caught.value.text


def test_lists_client_refusal_leaves_other_refusals_alone() -> None:
    lists = Lists(block_senders=["spam.example"], client_refusal=persona(550, "No thanks"))
    with pytest.raises(Reject) as caught:
        run(lists.on_mail(session(), Envelope(), Address("x@spam.example")))
    assert "Sender address rejected" in caught.value.text


def test_lists_from_section_passes_client_refusal_on() -> None:
    section = PolicySection("lists", {"block_networks": ["192.0.2.0/24"]}, None, "test [lists]")
    lists = Lists.from_section(section, client_refusal=persona(550, "No thanks"))
    with pytest.raises(Reject, match=r"No thanks \[192\.0\.2\.1\]"):
        run(lists.on_connect(session()))


# --- RateLimits(connect_refusal=) ---------------------------------------------------------


def test_rate_limits_refuse_connections_with_the_given_reply() -> None:
    limits = RateLimits(connections_per_ip="1/1h", connect_refusal=persona(421, "Too busy"))
    run(limits.on_connect(session()))
    with pytest.raises(TempFail) as caught:
        run(limits.on_connect(session()))
    assert caught.value.text == "Too busy [192.0.2.1]"
    assert caught.value.code == 421 and caught.value.disconnect


def test_rate_limits_connect_refusal_covers_blocked_logins_at_connect() -> None:
    limits = RateLimits(auth_failures_per_ip="1/1h", connect_refusal=persona(554, "Go away"))
    failed = session()
    failed.auth_failures = 1
    run(limits.on_close(failed))  # counts the failure
    with pytest.raises(Reject) as caught:
        run(limits.on_connect(session()))
    assert caught.value.text == "Go away [192.0.2.1]" and caught.value.disconnect


def test_rate_limits_connect_refusal_leaves_later_stages_alone() -> None:
    limits = RateLimits(recipients_per_ip="1/1h", connect_refusal=persona(421, "Too busy"))
    envelope = Envelope(Address("bob@sender.example"))
    run(limits.on_rcpt(session(), envelope, Address("a@rcpt.example")))
    with pytest.raises(TempFail) as caught:
        run(limits.on_rcpt(session(), envelope, Address("b@rcpt.example")))
    assert caught.value.code == 450 and "Too many recipients" in caught.value.text


def test_rate_limits_from_section_passes_connect_refusal_on() -> None:
    section = PolicySection("limits", {"connections_per_ip": "1/1h"}, None, "test [limits]")
    env = PolicyEnv(ServerOptions(policy=(section,)))
    limits = RateLimits.from_section(section, env, connect_refusal=persona(421, "Too busy"))
    run(limits.on_connect(session()))
    with pytest.raises(TempFail, match=r"Too busy \[192\.0\.2\.1\]"):
        run(limits.on_connect(session()))


# --- the relay table: warn_open_relay ------------------------------------------------------


def relay_env(**table: Any) -> PolicyEnv:
    sections = (PolicySection(relay.TABLE, table, None, "test relay"),) if table else ()
    return PolicyEnv(ServerOptions(open_relay=True, policy=sections))


def test_open_relay_warns_by_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mailgate.policy"):
        assert relay.plugins_from_options(relay_env()) == []
    assert any("open_relay is on" in r.getMessage() for r in caplog.records)


def test_warn_open_relay_false_keeps_it_quiet(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="mailgate.policy"):
        assert relay.plugins_from_options(relay_env(warn_open_relay=False)) == []
    assert caplog.records == []


def test_relay_table_keys_are_checked() -> None:
    with pytest.raises(PolicyConfigError, match="test relay warn_open_relay"):
        relay.plugins_from_options(relay_env(warn_open_relay="no"))
    with pytest.raises(PolicyConfigError, match="warn_open_relai"):
        relay.plugins_from_options(relay_env(warn_open_relai=False))


def test_warn_open_relay_changes_nothing_without_open_relay() -> None:
    section = PolicySection(relay.TABLE, {"warn_open_relay": False}, None, "test relay")
    env = PolicyEnv(ServerOptions(local_domains=("example.com",), policy=(section,)))
    [control] = relay.plugins_from_options(env)
    with pytest.raises(Reject, match="Relay access denied"):
        run(control.on_rcpt(session(), Envelope(), Address("x@elsewhere.example")))
