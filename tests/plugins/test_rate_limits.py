"""Rate limits: the GCRA counter store (fake clock: bursts, refill, retry_after, cost,
bounded memory), the [limits] table and its errors, the plugin's decisions per stage
without sockets, and real servers refusing connections (421), recipients and messages
(450 4.7.1) and failed logins per IP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import smtplib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mailgate import Server
from mailgate.hooks import Address, AuthAttempt, Envelope, Session, TempFail
from mailgate.plugins import rate_limits
from mailgate.plugins.counters import CounterStore, MemoryCounters, RateResult
from mailgate.plugins.policy import (
    DECISIONS,
    PolicyConfigError,
    PolicyEnv,
    mark_allowlisted,
)
from mailgate.plugins.rate_limits import Rate, RateLimits, retry_hint
from mailgate.server.errors import StartupError
from mailgate.server.options import PolicySection, ServerOptions
from mailgate.testing import running_server

MESSAGE = b"Subject: rate test\r\n\r\nhello\r\n"
# Client addresses of this file: 127.0.5.0/24 (any 127.x.y.z is a distinct client on Linux).
CLIENT = "127.0.5.1"
OTHER = "127.0.5.2"


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def session(peer: str = "192.0.2.1", user: str | None = None, sid: str = "t") -> Session:
    s = Session(id=sid, peer_host=peer, peer_port=1, local_host="127.0.0.1", local_port=25)
    s.user = user
    return s


def envelope(sender: str = "bob@sender.example") -> Envelope:
    return Envelope(Address(sender))


# --- the counter store --------------------------------------------------------------------


class Counters:
    """A counter store under test, called synchronously: its async API (the one the
    plugin uses) on an event loop of its own, where a Redis store's client lives."""

    def __init__(self, store: CounterStore, runner: asyncio.Runner) -> None:
        self.store = store
        self.runner = runner

    def take(self, key: str, limit: int, window: float, cost: int = 1) -> RateResult:
        return self.runner.run(self.store.hit(key, limit, window, cost))

    def peek(self, key: str, limit: int, window: float, cost: int = 1) -> RateResult:
        return self.runner.run(self.store.peek(key, limit, window, cost))


@pytest.fixture(params=["memory", "redis"])
def counters(request: pytest.FixtureRequest) -> Iterator[tuple[Counters, FakeClock]]:
    """The same store tests for each backend: the in-process MemoryCounters and
    RedisCounters on a real redis-server (tests/redis_server.py), both on a fake clock."""
    clock = FakeClock()
    store: CounterStore
    if request.param == "memory":
        store = MemoryCounters(clock=clock)
    else:
        from mailgate.plugins.redis_state import RedisCounters, RedisState

        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        store = RedisCounters(RedisState(url, timeout=5.0, key_prefix=prefix), clock=clock)
    with asyncio.Runner() as runner:
        yield Counters(store, runner), clock
        runner.run(store.aclose())


def test_burst_then_refusal_with_retry_after(counters: tuple[Counters, FakeClock]) -> None:
    store, clock = counters
    results = [store.take("k", 3, 60.0) for _ in range(3)]
    assert [r.allowed for r in results] == [True, True, True]
    assert [r.remaining for r in results] == [2, 1, 0]
    refused = store.take("k", 3, 60.0)
    assert not refused.allowed
    assert refused.remaining == 0
    assert refused.retry_after == pytest.approx(20.0)  # one hit frees every 60/3 s
    clock.advance(5)
    assert store.take("k", 3, 60.0).retry_after == pytest.approx(15.0)


def test_window_rolls_over(counters: tuple[Counters, FakeClock]) -> None:
    store, clock = counters
    for _ in range(2):
        assert store.take("k", 2, 10.0).allowed
    assert not store.take("k", 2, 10.0).allowed
    clock.advance(5.0)  # one interval: room for exactly one
    assert store.take("k", 2, 10.0).allowed
    assert not store.take("k", 2, 10.0).allowed
    clock.advance(10.0)  # a whole window: the full burst again
    assert [store.take("k", 2, 10.0).allowed for _ in range(3)] == [True, True, False]


def test_refused_hits_are_not_counted(counters: tuple[Counters, FakeClock]) -> None:
    store, clock = counters
    assert store.take("k", 1, 10.0).allowed
    for _ in range(50):  # hammering the closed door does not push the opening back
        assert not store.take("k", 1, 10.0).allowed
    clock.advance(10.0)
    assert store.take("k", 1, 10.0).allowed


def test_fractional_windows_and_odd_rates(counters: tuple[Counters, FakeClock]) -> None:
    """Floats travel to Redis and back exactly: the same answers at the edges."""
    store, clock = counters
    answers = []
    for step in range(40):
        answers.append(store.take("odd", 7, 2.9))
        clock.advance(0.1 * (step % 3))
    expected = MemoryCounters(clock=FakeClock())
    replay = FakeClock()
    expected.clock = replay
    wanted = []
    for step in range(40):
        wanted.append(expected.take("odd", 7, 2.9))
        replay.advance(0.1 * (step % 3))
    assert [(a.allowed, a.remaining) for a in answers] == [(w.allowed, w.remaining) for w in wanted]
    assert [a.retry_after for a in answers] == pytest.approx([w.retry_after for w in wanted])


def test_cost_and_peek(counters: tuple[Counters, FakeClock]) -> None:
    store, _ = counters
    assert store.take("k", 5, 50.0, cost=2).remaining == 3
    peeked = store.peek("k", 5, 50.0, cost=3)
    assert peeked == RateResult(True, 3)
    assert store.peek("k", 5, 50.0).remaining == 3  # peeking counts nothing
    refused = store.take("k", 5, 50.0, cost=4)
    assert not refused.allowed and refused.retry_after == pytest.approx(10.0)
    assert store.take("k", 5, 50.0, cost=3) == RateResult(True, 0)
    assert not store.peek("k", 5, 50.0).allowed
    with pytest.raises(ValueError, match="cost"):
        store.take("k", 5, 50.0, cost=6)
    with pytest.raises(ValueError, match="cost"):
        store.take("k", 5, 50.0, cost=0)
    with pytest.raises(ValueError, match="limit"):
        store.take("k", 0, 50.0)
    with pytest.raises(ValueError, match="window"):
        store.take("k", 1, 0.0)


def test_keys_are_independent_and_store_meets_the_protocol(
    counters: tuple[Counters, FakeClock],
) -> None:
    store, _ = counters
    assert isinstance(store.store, CounterStore)
    assert store.take("a", 1, 60.0).allowed
    assert not store.take("a", 1, 60.0).allowed
    assert store.take("b", 1, 60.0).allowed


def test_idle_keys_are_dropped_as_they_are_met() -> None:
    clock = FakeClock()
    store = MemoryCounters(clock=clock, max_keys=1000)
    for i in range(100):
        store.take(f"old{i}", 5, 10.0)
    assert len(store) == 100
    clock.advance(10.0)  # every bucket refilled: nothing left worth keeping
    for i in range(30):
        store.take(f"new{i}", 5, 10.0)
    # Each hit drops up to two idle keys from the least recently used end.
    assert len(store) == 30 + 100 - 2 * 30
    store.take("old99", 5, 10.0)  # used again: starts afresh, moved to the recent end
    for i in range(30, 60):
        store.take(f"new{i}", 5, 10.0)
    assert len(store) == 61  # every old key but the one used again is gone
    assert store.evicted == 0


def test_memory_stays_bounded_with_100k_idle_keys() -> None:
    clock = FakeClock()
    store = MemoryCounters(clock=clock, max_keys=5000)
    for i in range(100_000):
        clock.advance(0.001)
        store.take(f"ip{i}", 10, 1.0)  # a key is idle 1 s (1000 hits) after its hit
    assert len(store) <= 1002
    assert store.evicted == 0  # only idle keys were dropped: no count was lost


def test_memory_stays_bounded_with_100k_live_keys(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    store = MemoryCounters(clock=clock, max_keys=10_000)
    caplog.set_level(logging.WARNING, "mailgate.policy")
    started = time.perf_counter()
    for i in range(100_000):
        store.take(f"ip{i}", 10, 3600.0)  # none of them idle within the test
    assert time.perf_counter() - started < 5  # sweeps are amortised, not one per hit
    assert len(store) <= 10_000
    assert store.evicted >= 90_000
    assert store.take("ip99999", 10, 3600.0).remaining == 8  # the newest were kept
    assert store.take("ip0", 10, 3600.0).remaining == 9  # the oldest start over
    assert sum("max_keys" in r.getMessage() for r in caplog.records) == 1  # warned once


def test_aclose_clears() -> None:
    store = MemoryCounters(clock=FakeClock())
    store.take("k", 1, 1.0)
    run(store.aclose())
    assert len(store) == 0


# --- rates and the [limits] table ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit", "window"),
    [
        ("30/1m", 30, 60.0),
        ("100/1h", 100, 3600.0),
        (" 5 / 10m ", 5, 600.0),
        ("30/m", 30, 60.0),
        ("2/90", 2, 90.0),
        ("1000/1d", 1000, 86400.0),
        ("3/1.5s", 3, 1.5),
    ],
)
def test_rate_parse(text: str, limit: int, window: float) -> None:
    assert Rate.parse(text) == Rate(limit, window)


@pytest.mark.parametrize("text", ["30", "/1m", "x/1m", "-1/1m", "0/1m", "30/", "30/1y", "30/0s"])
def test_rate_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        Rate.parse(text)


def test_rate_text_and_retry_hints() -> None:
    assert str(Rate.parse("30/60s")) == "30/1m"
    assert str(Rate.parse("5/10m")) == "5/10m"
    assert str(Rate.parse("2/90s")) == "2/90s"
    assert retry_hint(0.2) == "1 second"
    assert retry_hint(40.0) == "40 seconds"
    assert retry_hint(39.2) == "40 seconds"  # rounded up: waiting that long finds room
    assert retry_hint(150.0) == "3 minutes"
    assert retry_hint(5 * 3600.0) == "5 hours"


def section(**values: Any) -> PolicySection:
    return PolicySection("limits", values, None, "mailgate.toml [limits]")


def env(workers: int = 1, **values: Any) -> PolicyEnv:
    return PolicyEnv(ServerOptions(workers=workers, policy=(section(**values),)))


def test_table_read_into_plugin() -> None:
    clock = FakeClock()
    plugin = RateLimits.from_section(
        section(
            connections_per_ip="30/1m",
            messages_per_ip="100/1h",
            recipients_per_ip="500/1h",
            messages_per_user="200/1h",
            recipients_per_user="1000/1h",
            messages_per_sender_domain="500/1h",
            recipients_per_sender_domain="2000/1h",
            auth_failures_per_ip="5/10m",
            auth_failures_block="auth",
            ipv6_prefix=56,
            max_keys=5000,
        ),
        PolicyEnv(ServerOptions(), clock),
    )
    assert plugin.connections_per_ip == Rate(30, 60.0)
    assert plugin.auth_failures_per_ip == Rate(5, 600.0)
    assert plugin.recipients_per_sender_domain == Rate(2000, 3600.0)
    assert plugin.auth_failures_block == "auth"
    assert plugin.ipv6_prefix == 56
    assert isinstance(plugin.store, MemoryCounters)
    assert plugin.store.max_keys == 5000
    assert plugin.store.clock is clock


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"messages_per_ip": "lots"}, 'messages_per_ip: expected "COUNT/WINDOW"'),
        ({"messages_per_ip": 100}, 'messages_per_ip: expected "COUNT/WINDOW" like "100/1h"'),
        ({"recipients_per_ip": "10/1y"}, "bad window '1y'"),
        ({"auth_failures_per_ip": "0/1m"}, "count must be a whole number of at least 1"),
        (
            {"messages_per_ip": "1/1m", "mesages_per_user": "1/1m"},
            "did you mean 'messages_per_user'",
        ),
        ({"ipv6_prefix": 129}, "ipv6_prefix: must be at most 128"),
        ({"ipv6_prefix": 8}, "ipv6_prefix: must be at least 16"),
        ({"auth_failures_block": "ip"}, "not one of connection, auth"),
    ],
)
def test_table_errors_say_where(values: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyConfigError) as error:
        RateLimits.from_section(section(**values), PolicyEnv(ServerOptions()))
    assert str(error.value).startswith("mailgate.toml [limits]")
    assert message in str(error.value)


def test_plugins_from_options(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mailgate.policy")
    assert rate_limits.plugins_from_options(PolicyEnv(ServerOptions())) == []
    assert rate_limits.plugins_from_options(env()) == []  # a table without limits
    assert "sets no limit" in caplog.text
    [plugin] = rate_limits.plugins_from_options(env(workers=4, messages_per_ip="10/1m"))
    assert isinstance(plugin, RateLimits) and plugin.name == "rate-limits"
    assert "rate limits: messages_per_ip 10/1m" in caplog.text
    assert "each of the 4 worker processes" in caplog.text


def test_constructor_from_code_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="COUNT/WINDOW"):
        RateLimits(messages_per_ip="many")
    with pytest.raises(ValueError, match="auth_failures_block"):
        RateLimits(auth_failures_block="never")
    with pytest.raises(ValueError, match="ipv6_prefix"):
        RateLimits(ipv6_prefix=200)
    assert not RateLimits().active
    assert RateLimits(connections_per_ip=Rate(3, 1.0)).active


# --- the plugin, without sockets ----------------------------------------------------------


def test_ipv6_clients_counted_per_prefix() -> None:
    limits = RateLimits(connections_per_ip="1/1m", clock=FakeClock())
    assert limits.client("192.0.2.1") == "192.0.2.1"
    assert limits.client("::ffff:192.0.2.1") == "192.0.2.1"
    assert limits.client("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert RateLimits(ipv6_prefix=48).client("2001:db8:1:2::1") == "2001:db8:1::/48"
    assert RateLimits(ipv6_prefix=128).client("2001:DB8::1") == "2001:db8::1"
    assert limits.client("unix") == "unix"

    run(limits.on_connect(session("2001:db8:1:2::1")))
    with pytest.raises(TempFail) as refused:  # the same /64: the same counter
        run(limits.on_connect(session("2001:db8:1:2:ffff::9")))
    assert refused.value.code == 421 and refused.value.disconnect
    assert "Too many connections from 2001:db8:1:2::/64" in refused.value.text
    run(limits.on_connect(session("2001:db8:1:3::1")))  # the next /64 is someone else


def test_connections_refused_with_retry_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limits = RateLimits(connections_per_ip="2/1m", clock=clock)
    caplog.set_level(logging.INFO, "mailgate.policy")
    before = DECISIONS[("rate-limits", "tempfail")]
    run(limits.on_connect(session()))
    run(limits.on_connect(session()))
    with pytest.raises(TempFail) as refused:
        run(limits.on_connect(session(sid="third")))
    error = refused.value
    assert (error.code, error.enhanced, error.disconnect) == (421, "4.7.0", True)
    assert error.text == "Too many connections from 192.0.2.1, try again in 30 seconds"
    assert DECISIONS[("rate-limits", "tempfail")] == before + 1
    [record] = [r for r in caplog.records if getattr(r, "policy", None) == "rate-limits"]
    assert record.limit == "connections_per_ip"  # type: ignore[attr-defined]
    assert record.subject == "192.0.2.1"  # type: ignore[attr-defined]
    assert record.retry_after == 30  # type: ignore[attr-defined]
    assert "session third: policy rate-limits: tempfail" in record.getMessage()
    clock.advance(30)
    run(limits.on_connect(session()))


def test_recipients_per_ip_and_per_sender_domain() -> None:
    clock = FakeClock()
    limits = RateLimits(recipients_per_ip="3/1h", recipients_per_sender_domain="2/1h", clock=clock)
    client = session()
    rcpt = Address("u@example.com")
    run(limits.on_rcpt(client, envelope("a@Sender.Example"), rcpt))
    run(limits.on_rcpt(client, envelope("b@sender.example"), rcpt))
    with pytest.raises(TempFail) as refused:  # the domain's limit, whatever the case
        run(limits.on_rcpt(client, envelope("c@SENDER.example"), rcpt))
    assert (refused.value.code, refused.value.enhanced) == (450, "4.7.1")
    assert refused.value.text == (
        "<u@example.com>: Too many recipients from sender domain sender.example, "
        "try again in 30 minutes"
    )
    assert not refused.value.disconnect
    # The refused recipient took nothing from the client's own limit.
    run(limits.on_rcpt(client, envelope("x@other.example"), rcpt))
    with pytest.raises(TempFail, match=r"Too many recipients from 192\.0\.2\.1"):
        run(limits.on_rcpt(client, envelope("y@third.example"), rcpt))
    # The null sender has no domain to count: only the client's limit applies to it.
    with pytest.raises(TempFail, match=r"from 192\.0\.2\.1"):
        run(limits.on_rcpt(client, envelope(""), rcpt))
    run(limits.on_rcpt(session("192.0.2.9"), envelope(""), rcpt))


def test_both_full_reply_names_the_one_that_frees_last() -> None:
    limits = RateLimits(recipients_per_ip="1/1m", recipients_per_sender_domain="1/1h")
    client, rcpt = session(), Address("u@example.com")
    run(limits.on_rcpt(client, envelope(), rcpt))
    with pytest.raises(TempFail) as refused:
        run(limits.on_rcpt(client, envelope(), rcpt))
    assert "sender domain sender.example, try again in 60 minutes" in refused.value.text


def test_messages_per_user_instead_of_per_ip() -> None:
    clock = FakeClock()
    limits = RateLimits(messages_per_ip="1/1h", messages_per_user="2/1h", clock=clock)
    alice = session(user="alice")
    for _ in range(2):  # alice is counted as alice, not as her address
        run(limits.on_data_start(alice, envelope()))
    with pytest.raises(TempFail) as refused:
        run(limits.on_data_start(alice, envelope()))
    assert refused.value.code == 450 and refused.value.enhanced == "4.7.1"
    assert refused.value.text == "Too many messages from user alice, try again in 30 minutes"
    run(limits.on_data_start(session(user="bob"), envelope()))
    run(limits.on_data_start(session(), envelope()))  # the address still has its own
    with pytest.raises(TempFail, match=r"Too many messages from 192\.0\.2\.1"):
        run(limits.on_data_start(session(), envelope()))


def test_per_ip_limit_counts_users_when_no_per_user_limit_is_set() -> None:
    limits = RateLimits(messages_per_ip="1/1h", clock=FakeClock())
    run(limits.on_data_start(session(user="alice"), envelope()))
    with pytest.raises(TempFail, match=r"from 192\.0\.2\.1"):
        run(limits.on_data_start(session(user="bob"), envelope()))


def test_auth_failures_counted_from_the_session_and_refused() -> None:
    clock = FakeClock()
    limits = RateLimits(auth_failures_per_ip="3/1h", clock=clock)
    attempt = AuthAttempt("PLAIN", "alice", password="wrong")
    client = session()
    run(limits.on_auth(client, attempt))
    client.auth_failures = 1  # what the server does after a 535
    run(limits.on_auth(client, attempt))  # the first failure is counted here
    client.auth_failures = 2
    run(limits.on_close(client))  # and the second when the connection ends
    run(limits.on_close(client))  # once only
    assert run(limits.store.peek("auth_failures_per_ip:192.0.2.1", 3, 3600.0)).remaining == 1

    again = session(sid="again")
    run(limits.on_connect(again))
    run(limits.on_auth(again, attempt))
    again.auth_failures = 1
    run(limits.on_mail(again, envelope(), Address("a@b.example")))  # failure three
    with pytest.raises(TempFail) as refused:
        run(limits.on_auth(again, attempt))
    error = refused.value
    assert (error.code, error.enhanced, error.disconnect) == (421, "4.7.0", True)
    assert error.text == "Too many failed logins from 192.0.2.1, try again in 20 minutes"
    # auth_failures_block = "connection" (the default): refused at connect as well.
    with pytest.raises(TempFail, match=r"Too many failed logins from 192\.0\.2\.1") as banner:
        run(limits.on_connect(session(sid="third")))
    assert banner.value.code == 421 and banner.value.disconnect
    run(limits.on_connect(session("192.0.2.2")))  # other clients are not concerned
    clock.advance(20 * 60)
    run(limits.on_connect(session(sid="later")))


def test_auth_failures_beyond_the_room_left_fill_it() -> None:
    limits = RateLimits(auth_failures_per_ip="5/1h", clock=FakeClock())
    first = session()
    first.auth_failures = 4
    run(limits.on_close(first))
    second = session(sid="second")
    run(limits.on_auth(second, AuthAttempt("PLAIN", "alice", password="x")))
    second.auth_failures = 3  # more than the one left: the limit is reached, not skipped
    with pytest.raises(TempFail, match="failed logins"):
        run(limits.on_auth(second, AuthAttempt("PLAIN", "alice", password="x")))


def test_auth_failures_block_auth_only_keeps_the_connection() -> None:
    limits = RateLimits(auth_failures_per_ip="1/1h", auth_failures_block="auth")
    client = session()
    client.auth_failures = 1
    run(limits.on_close(client))
    run(limits.on_connect(session()))  # may still connect (and send to local domains)
    with pytest.raises(TempFail, match="failed logins"):
        run(limits.on_auth(session(), AuthAttempt("PLAIN", "alice", password="x")))


def test_allowlisted_clients_skip_every_check(caplog: pytest.LogCaptureFixture) -> None:
    limits = RateLimits(
        connections_per_ip="1/1h",
        recipients_per_ip="1/1h",
        messages_per_ip="1/1h",
        auth_failures_per_ip="1/1h",
        clock=FakeClock(),
    )
    caplog.set_level(logging.INFO, "mailgate.policy")
    before = DECISIONS[("rate-limits", "skip")]
    trusted = session()
    mark_allowlisted(trusted, "client 192.0.2.1 in allow.txt")
    for _ in range(3):
        run(limits.on_connect(trusted))
        run(limits.on_rcpt(trusted, envelope(), Address("u@example.com")))
        run(limits.on_data_start(trusted, envelope()))
    trusted.auth_failures = 3
    run(limits.on_close(trusted))
    assert len(limits.store) == 0  # type: ignore[arg-type]
    assert DECISIONS[("rate-limits", "skip")] == before + 1  # said once per session
    assert "skip (allow-listed: client 192.0.2.1 in allow.txt)" in caplog.text
    run(limits.on_connect(session()))  # the same address, not allow-listed: counted


class RecordingStore:
    """A CounterStore of our own (what a Redis store will be), recording its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, float, int]] = []
        self.closed = False

    async def hit(self, key: str, limit: int, window: float, cost: int = 1) -> RateResult:
        self.calls.append(("hit", key, limit, window, cost))
        return RateResult(True, limit - cost)

    async def peek(self, key: str, limit: int, window: float, cost: int = 1) -> RateResult:
        self.calls.append(("peek", key, limit, window, cost))
        return RateResult(True, limit)

    async def aclose(self) -> None:
        self.closed = True


def test_a_store_of_ones_own() -> None:
    store = RecordingStore()
    assert isinstance(store, CounterStore)
    limits = RateLimits(messages_per_user="10/1h", messages_per_sender_domain="20/1d", store=store)
    run(limits.on_data_start(session(user="alice"), envelope("a@Example.org")))
    assert store.calls == [
        ("peek", "messages_per_user:alice", 10, 3600.0, 1),
        ("peek", "messages_per_sender_domain:example.org", 20, 86400.0, 1),
        ("hit", "messages_per_user:alice", 10, 3600.0, 1),
        ("hit", "messages_per_sender_domain:example.org", 20, 86400.0, 1),
    ]
    run(limits.aclose())
    assert not store.closed  # the caller's store is the caller's to close
    owned = RateLimits(messages_per_ip="1/1s")
    owned.store.take("x", 1, 1.0)  # type: ignore[attr-defined]
    run(owned.aclose())
    assert len(owned.store) == 0  # type: ignore[arg-type]


# --- real servers -------------------------------------------------------------------------


@pytest.fixture
def smtp() -> Iterator[list[smtplib.SMTP]]:
    """Clients opened by a test, closed after it."""
    clients: list[smtplib.SMTP] = []
    yield clients
    for client in clients:
        with contextlib.suppress(OSError):
            client.close()


def connect(srv: Any, clients: list[smtplib.SMTP], source: str = CLIENT) -> smtplib.SMTP:
    client = smtplib.SMTP(srv.host, srv.port, source_address=(source, 0), timeout=10)
    clients.append(client)
    return client


def test_server_third_connection_gets_421(smtp: list[smtplib.SMTP]) -> None:
    with running_server(limits={"connections_per_ip": "2/1m"}) as srv:
        connect(srv, smtp).ehlo()
        connect(srv, smtp).ehlo()
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            connect(srv, smtp)
        assert refused.value.smtp_code == 421
        error = refused.value.smtp_error
        text = error.decode() if isinstance(error, bytes) else error
        # The banner carries no enhanced code (RFC 2034): the server leaves 4.7.0 out.
        assert text.startswith("Too many connections from 127.0.5.1, try again in 30 seconds")
        assert connect(srv, smtp, OTHER).noop()[0] == 250


def test_server_recipients_limit_450_with_retry_hint(smtp: list[smtplib.SMTP]) -> None:
    with running_server(limits={"recipients_per_ip": "2/1h"}) as srv:
        client = connect(srv, smtp)
        client.ehlo()
        assert client.mail("a@sender.example")[0] == 250
        assert client.rcpt("one@example.com")[0] == 250
        assert client.rcpt("two@example.com")[0] == 250
        code, text = client.rcpt("three@example.com")
        assert code == 450
        assert text.decode() == (
            "4.7.1 <three@example.com>: Too many recipients from 127.0.5.1, try again in 30 minutes"
        )
        assert client.docmd("DATA")[0] == 354  # the accepted two still get the message
        client.send(MESSAGE + b".\r\n")
        assert client.getreply()[0] == 250
        assert srv.messages.wait(1)[0].rcpt_tos == ["one@example.com", "two@example.com"]


def test_server_messages_per_ip(smtp: list[smtplib.SMTP]) -> None:
    with running_server(limits={"messages_per_ip": "1/1m"}) as srv:
        client = connect(srv, smtp)
        client.sendmail("a@sender.example", ["u@example.com"], MESSAGE)
        client.mail("a@sender.example")
        client.rcpt("u@example.com")
        code, text = client.docmd("DATA")
        assert code == 450
        assert text.decode() == "4.7.1 Too many messages from 127.0.5.1, try again in 60 seconds"
        assert client.rset()[0] == 250
        other = connect(srv, smtp, OTHER)
        assert other.sendmail("a@sender.example", ["u@example.com"], MESSAGE) == {}
        assert len(srv.messages.wait(2)) == 2


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_server_messages_per_user(smtp: list[smtplib.SMTP]) -> None:
    settings: dict[str, Any] = {
        "auth_users": ["alice:pw"],
        "allow_insecure_auth": True,
        "limits": {"messages_per_user": "1/1h", "messages_per_ip": "10/1h"},
    }
    with running_server(**settings) as srv:
        client = connect(srv, smtp)
        client.ehlo()
        assert "PLAIN" in client.esmtp_features["auth"]
        assert client.docmd(plain("alice", "pw"))[0] == 235
        client.sendmail("alice@example.com", ["u@example.com"], MESSAGE)
        client.mail("alice@example.com")
        client.rcpt("u@example.com")
        code, text = client.docmd("DATA")
        assert (code, text.decode()) == (
            450,
            "4.7.1 Too many messages from user alice, try again in 60 minutes",
        )
        client.rset()
        anonymous = connect(srv, smtp)  # the same address, not logged in: its own limit
        assert anonymous.sendmail("a@sender.example", ["u@example.com"], MESSAGE) == {}


def test_server_auth_failures_per_ip(smtp: list[smtplib.SMTP]) -> None:
    settings: dict[str, Any] = {
        "auth_users": ["alice:pw"],
        "allow_insecure_auth": True,
        "limits": {"auth_failures_per_ip": "2/1h"},
        # Above the limit: the server's own hang-up after 3 failures does not come first.
        "max_auth_failures": 5,
    }
    with running_server(**settings) as srv:
        client = connect(srv, smtp)
        client.ehlo()
        assert client.docmd(plain("alice", "nope"))[0] == 535
        assert client.docmd(plain("mallory", "x"))[0] == 535
        code, text = client.docmd(plain("alice", "pw"))  # over the limit: even good ones
        assert code == 421
        assert text.decode() == (
            "4.7.0 Too many failed logins from 127.0.5.1, try again in 30 minutes"
        )
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            connect(srv, smtp)
        assert refused.value.smtp_code == 421
        assert b"Too many failed logins from 127.0.5.1" in refused.value.smtp_error
        other = connect(srv, smtp, OTHER)
        other.ehlo()
        assert other.docmd(plain("alice", "pw"))[0] == 235


def test_server_auth_failures_block_auth_only(smtp: list[smtplib.SMTP]) -> None:
    settings: dict[str, Any] = {
        "auth_users": ["alice:pw"],
        "allow_insecure_auth": True,
        "limits": {"auth_failures_per_ip": "1/1h", "auth_failures_block": "auth"},
    }
    with running_server(**settings) as srv:
        client = connect(srv, smtp)
        client.ehlo()
        assert client.docmd(plain("alice", "nope"))[0] == 535
        assert client.docmd(plain("alice", "pw"))[0] == 421
        later = connect(srv, smtp)  # the connection is let in; AUTH is not
        later.ehlo()
        assert later.sendmail("a@sender.example", ["u@example.com"], MESSAGE) == {}
        assert later.docmd(plain("alice", "pw"))[0] == 421


def test_server_without_auth_backend_offers_no_auth(smtp: list[smtplib.SMTP]) -> None:
    limits = {"auth_failures_per_ip": "2/1h"}
    with running_server(allow_insecure_auth=True, limits=limits) as srv:
        client = connect(srv, smtp)
        client.ehlo()
        assert not client.has_extn("auth")


class MarkTrusted:
    """Stands in for the lists policy: allow-lists one address before the limits run."""

    name = "mark-trusted"

    async def on_connect(self, session: Session) -> None:
        if session.peer_host == OTHER:
            mark_allowlisted(session, f"client {OTHER} in test list")


def test_server_allowlisted_client_is_not_limited(smtp: list[smtplib.SMTP]) -> None:
    def configure(server: Server) -> None:
        server.add_plugin(MarkTrusted(), before="rate-limits")

    limits = {"connections_per_ip": "1/1h", "messages_per_ip": "1/1h"}
    with running_server(limits=limits, configure=configure) as srv:
        for _ in range(3):
            client = connect(srv, smtp, OTHER)
            client.sendmail("a@sender.example", ["u@example.com"], MESSAGE)
            client.sendmail("a@sender.example", ["u@example.com"], MESSAGE)
            client.quit()
        assert len(srv.messages.wait(6)) == 6
        connect(srv, smtp).quit()
        with pytest.raises(smtplib.SMTPConnectError):
            connect(srv, smtp)


def test_server_plugin_from_code_with_injected_clock(smtp: list[smtplib.SMTP]) -> None:
    clock = FakeClock()
    limits = RateLimits(recipients_per_ip="1/10m", clock=clock)
    with running_server(configure=lambda server: server.add_plugin(limits)) as srv:
        client = connect(srv, smtp)
        client.ehlo()
        client.mail("a@sender.example")
        assert client.rcpt("one@example.com")[0] == 250
        code, text = client.rcpt("two@example.com")
        assert code == 450 and text.endswith(b"try again in 10 minutes")
        clock.advance(599)
        assert client.rcpt("two@example.com")[1].endswith(b"try again in 1 second")
        clock.advance(1)
        assert client.rcpt("two@example.com")[0] == 250
        client.quit()


def test_server_real_short_window_rolls_over(smtp: list[smtplib.SMTP]) -> None:
    with running_server(limits={"recipients_per_ip": "1/1s"}) as srv:
        client = connect(srv, smtp)
        client.ehlo()
        client.mail("a@sender.example")
        assert client.rcpt("one@example.com")[0] == 250
        assert client.rcpt("two@example.com")[0] == 450
        time.sleep(1.05)
        assert client.rcpt("two@example.com")[0] == 250
        client.quit()


def test_server_bad_table_stops_start() -> None:
    with pytest.raises(StartupError, match=r"setting \[limits\] messages_per_ip: expected"):
        with running_server(limits={"messages_per_ip": "a lot"}):
            pass
