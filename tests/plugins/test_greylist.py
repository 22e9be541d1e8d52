"""Greylisting: the triplet logic with an injected clock (no waiting), the SQLite store
(persistence, WAL, two connections at once, pruning, failing open), the configuration,
and a real server refusing a first attempt with 451 4.7.1 and accepting the retry.

Clients of the integration tests come from 127.0.5.0/24 (reserved for this file)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import smtplib
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mailgate.config import build_options, options_from_settings
from mailgate.hooks import Address, Envelope, Session, TempFail
from mailgate.plugins.greylist import (
    DEFAULT_DATABASE,
    PRUNE_INTERVAL,
    Greylist,
    client_network,
    normalize_sender,
    plugins_from_options,
)
from mailgate.plugins.greylist_store import ClientState, GreylistStore, Triplet, TripletState
from mailgate.plugins.policy import (
    DECISIONS,
    PolicyConfigError,
    PolicyEnv,
    mark_allowlisted,
)
from mailgate.testing import running_server

T = TypeVar("T")

DELAY = 300.0
RETRY_WINDOW = 3600.0
EXPIRY = 86400.0
START = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run(awaitable: Awaitable[T]) -> T:
    async def main() -> T:
        return await awaitable

    return asyncio.run(main())


def make_session(ip: str = "192.0.2.1", user: str | None = None) -> Session:
    session = Session(id="t", peer_host=ip, peer_port=1, local_host="127.0.0.1", local_port=25)
    session.user = user
    return session


@dataclass(frozen=True)
class Backend:
    """Where a test's greylisting state lives: the SQLite file (``url`` None) or a real
    Redis server under a key prefix of the test's own."""

    name: str
    url: str | None = None
    prefix: str = ""


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The triplet logic's tests run on each store: same tests, same results."""
    if request.param == "sqlite":
        return Backend("sqlite")
    return Backend(
        "redis", request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
    )


def make_plugin(
    tmp_path: Path, clock: FakeClock, backend: Backend | None = None, **kwargs: Any
) -> Greylist:
    settings: dict[str, Any] = {
        "delay": DELAY,
        "retry_window": RETRY_WINDOW,
        "expiry": EXPIRY,
        "auto_allow_after": 0,
        "database": tmp_path / "grey.sqlite3",
        "clock": clock,
        **kwargs,
    }
    plugin = Greylist(**settings)
    if backend is not None and backend.url is not None:
        from mailgate.plugins.redis_state import RedisGreylistStore, RedisState

        # The SQLite store made by the constructor was never opened: nothing to close.
        state = RedisState(backend.url, timeout=5.0, key_prefix=backend.prefix)
        plugin.store = RedisGreylistStore(
            state, retry_window=plugin.retry_window, expiry=plugin.expiry
        )
    return plugin


async def attempt(
    plugin: Greylist,
    ip: str = "192.0.2.1",
    sender: str = "alice@sender.test",
    recipient: str = "bob@example.com",
    session: Session | None = None,
) -> TempFail | None:
    """One RCPT: None when let through, else the TempFail raised."""
    session = session or make_session(ip)
    envelope = Envelope(mail_from=Address(sender))
    try:
        await plugin.on_rcpt(session, envelope, Address(recipient))
    except TempFail as refusal:
        return refusal
    return None


def assert_greylisted(refusal: TempFail | None, seconds: int) -> None:
    assert refusal is not None, "expected a 451"
    unit = "second" if seconds == 1 else "seconds"
    assert (refusal.code, refusal.enhanced) == (451, "4.7.1")
    assert refusal.text == f"Greylisted, please try again in {seconds} {unit}"


def rows(path: Path, table: str = "triplets") -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return list(db.execute(f"SELECT * FROM {table} ORDER BY 1, 2"))
    finally:
        db.close()


# --- the triplet logic ----------------------------------------------------------------------


def test_first_attempt_then_early_retry_then_pass_after_delay(
    tmp_path: Path, backend: Backend
) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        plugin = make_plugin(tmp_path, clock, backend)
        try:
            assert_greylisted(await attempt(plugin), 300)
            clock.advance(100.4)
            assert_greylisted(await attempt(plugin), 200)  # the remaining time, rounded up
            clock.advance(199)
            assert_greylisted(await attempt(plugin), 1)
            clock.advance(0.6)  # exactly `delay` after the first attempt
            assert await attempt(plugin) is None
            clock.advance(3 * RETRY_WINDOW)  # passed triplets do not care about the window
            assert await attempt(plugin) is None
            triplet = Triplet("192.0.2.0/24", "alice@sender.test", "bob@example.com")
            assert await plugin.store.lookup(triplet) == TripletState(
                START, START + 300 + 3 * RETRY_WINDOW, START + 300
            )
        finally:
            await plugin.aclose()

    run(scenario())
    if backend.url is not None:
        return
    [row] = rows(tmp_path / "grey.sqlite3")
    assert row == (
        "192.0.2.0/24",
        "alice@sender.test",
        "bob@example.com",
        START,
        START + 300 + 3 * RETRY_WINDOW,
        START + 300,
    )


def test_passed_triplet_expires_after_its_last_mail_and_is_refreshed_by_use(
    tmp_path: Path,
    backend: Backend,
) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        plugin = make_plugin(tmp_path, clock, backend)
        try:
            assert await attempt(plugin) is not None
            clock.advance(DELAY)
            assert await attempt(plugin) is None
            for _ in range(3):  # each mail within `expiry` of the last keeps it passed
                clock.advance(EXPIRY - 1)
                assert await attempt(plugin) is None
            clock.advance(EXPIRY + 1)
            assert_greylisted(await attempt(plugin), 300)  # expired: starts over
            clock.advance(DELAY)
            assert await attempt(plugin) is None
        finally:
            await plugin.aclose()

    run(scenario())


def test_a_retry_after_the_retry_window_starts_over(tmp_path: Path, backend: Backend) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        plugin = make_plugin(tmp_path, clock, backend)
        try:
            assert await attempt(plugin) is not None
            clock.advance(RETRY_WINDOW + 1)
            assert_greylisted(await attempt(plugin), 300)  # too late: a new first attempt
            clock.advance(DELAY - 1)
            assert_greylisted(await attempt(plugin), 1)
            clock.advance(1)
            assert await attempt(plugin) is None
        finally:
            await plugin.aclose()

    run(scenario())


def test_clients_are_grouped_by_ipv4_24_and_ipv6_64(tmp_path: Path, backend: Backend) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        plugin = make_plugin(tmp_path, clock, backend)
        try:
            assert await attempt(plugin, ip="192.0.2.1") is not None
            assert await attempt(plugin, ip="2001:db8:1:2::1") is not None
            clock.advance(DELAY)
            # A retry from another machine of the same network passes (server farms).
            assert await attempt(plugin, ip="192.0.2.254") is None
            assert await attempt(plugin, ip="2001:db8:1:2:ffff:ffff:ffff:fffe") is None
            # Another network is another triplet.
            assert_greylisted(await attempt(plugin, ip="192.0.3.1"), 300)
            assert_greylisted(await attempt(plugin, ip="2001:db8:1:3::1"), 300)
        finally:
            await plugin.aclose()

    run(scenario())


def test_client_network() -> None:
    assert client_network("192.0.2.77") == "192.0.2.0/24"
    assert client_network("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert client_network("2001:db8:a:b:c:d:e:f") == "2001:db8:a:b::/64"
    assert client_network("[2001:db8::1]") == "2001:db8::/64"
    assert client_network("192.0.2.77", ipv4_prefix=32) == "192.0.2.77/32"
    assert client_network("2001:db8:a:b::1", ipv6_prefix=48) == "2001:db8:a::/48"
    assert client_network("unix-socket") is None


def test_narrower_prefixes_separate_machines(tmp_path: Path, backend: Backend) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        plugin = make_plugin(tmp_path, clock, backend, ipv4_prefix=32, ipv6_prefix=128)
        try:
            assert await attempt(plugin, ip="192.0.2.1") is not None
            assert await attempt(plugin, ip="2001:db8::1") is not None
            clock.advance(DELAY)
            assert await attempt(plugin, ip="192.0.2.2") is not None
            assert await attempt(plugin, ip="2001:db8::2") is not None
            assert await attempt(plugin, ip="192.0.2.1") is None
            assert await attempt(plugin, ip="2001:db8::1") is None
        finally:
            await plugin.aclose()

    run(scenario())


def test_a_network_that_passed_n_triplets_is_passed_wholesale(
    tmp_path: Path, backend: Backend
) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        plugin = make_plugin(tmp_path, clock, backend, auto_allow_after=2)
        try:
            for recipient in ("one@example.com", "two@example.com"):
                assert await attempt(plugin, ip="198.51.100.1", recipient=recipient) is not None
            assert await attempt(plugin, ip="198.51.100.1", recipient="three@example.com")
            clock.advance(DELAY)
            for recipient in ("one@example.com", "two@example.com"):
                assert await attempt(plugin, ip="198.51.100.9", recipient=recipient) is None
            # A pass of an already passed triplet does not count again.
            assert await attempt(plugin, ip="198.51.100.1", recipient="one@example.com") is None
            assert await plugin.store.lookup_client("198.51.100.0/24") == ClientState(
                2, START + DELAY
            )
            # Now any triplet of that network passes at once, even a new one...
            assert await attempt(plugin, ip="198.51.100.7", recipient="new@example.com") is None
            assert await attempt(plugin, ip="198.51.100.7", sender="x@y.test") is None
            # ...but not other networks.
            assert_greylisted(await attempt(plugin, ip="203.0.113.1"), 300)
            # The allowance expires like a triplet, and the count starts over.
            clock.advance(EXPIRY + 1)
            assert await attempt(plugin, ip="198.51.100.7", recipient="later@example.com")
        finally:
            await plugin.aclose()

    run(scenario())


def test_auto_allow_off_with_zero(tmp_path: Path, backend: Backend) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        plugin = make_plugin(tmp_path, clock, backend, auto_allow_after=0)
        try:
            for index in range(4):
                assert await attempt(plugin, recipient=f"r{index}@example.com") is not None
            clock.advance(DELAY)
            for index in range(4):
                assert await attempt(plugin, recipient=f"r{index}@example.com") is None
            assert await attempt(plugin, recipient="fresh@example.com") is not None
            assert await plugin.store.lookup_client("192.0.2.0/24") is None  # nothing counted
        finally:
            await plugin.aclose()

    run(scenario())


def test_null_sender_is_keyed_as_angle_brackets(tmp_path: Path, backend: Backend) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        plugin = make_plugin(tmp_path, clock, backend)
        try:
            assert_greylisted(await attempt(plugin, sender=""), 300)
            triplet = Triplet("192.0.2.0/24", "<>", "bob@example.com")
            assert await plugin.store.lookup(triplet) == TripletState(START, START, None)
            clock.advance(DELAY)
            assert await attempt(plugin, sender="alice@sender.test") is not None  # different
            assert await attempt(plugin, sender="") is None
        finally:
            await plugin.aclose()

    run(scenario())


@pytest.mark.parametrize(
    ("sender", "key"),
    [
        ("", "<>"),
        ("<>", "<>"),
        ("Alice@Example.COM", "alice@example.com"),
        ("prvs=0123abcdef=alice@example.com", "alice@example.com"),
        ("PRVS=1234567890=alice@example.com", "alice@example.com"),
        ("msprvs1=19bp2lsf9bo7v=bounces@example.com", "bounces@example.com"),
        ("SRS0=HHH=TT=example.org=alice@forwarder.test", "alice@example.org"),
        ("SRS0+abCD=2K=example.org=alice@forwarder.test", "alice@example.org"),
        ("SRS1=HHH=fwd1.test==HHH=TT=example.org=alice@fwd2.test", "alice@example.org"),
        ("list+bounces-1234@lists.test", "list@lists.test"),
        ("bounce-1234-5678@lists.test", "bounce-#-#@lists.test"),
        ("user123@example.com", "user123@example.com"),
        ("+plus@example.com", "+plus@example.com"),
        ("no-at-sign", "no-at-sign"),
    ],
)
def test_normalize_sender(sender: str, key: str) -> None:
    assert normalize_sender(sender) == key


def test_changing_tags_and_case_still_match_the_first_attempt(
    tmp_path: Path, backend: Backend
) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        plugin = make_plugin(tmp_path, clock, backend)
        try:
            first = await attempt(
                plugin, sender="prvs=0111aaaaaa=Alice@Sender.test", recipient="Bob@Example.COM"
            )
            assert first is not None
            clock.advance(DELAY)
            retry = await attempt(
                plugin, sender="prvs=0112bbbbbb=alice@sender.test", recipient="bob@example.com"
            )
            assert retry is None
        finally:
            await plugin.aclose()

    run(scenario())


def test_exempt_clients_skip_and_leave_no_state(tmp_path: Path, backend: Backend) -> None:
    clock = FakeClock()
    before = DECISIONS[("greylist", "skip")]

    async def scenario() -> None:
        plugin = make_plugin(tmp_path, clock, backend, relay_networks=options_relay())
        try:
            assert await attempt(plugin, session=make_session("192.0.2.1", user="alice")) is None
            allowed = make_session("192.0.2.2")
            mark_allowlisted(allowed, "client 192.0.2.2 in allow.txt")
            assert await attempt(plugin, session=allowed) is None
            assert await attempt(plugin, ip="127.0.0.1") is None  # relay_networks
            assert await attempt(plugin, ip="::1") is None
            triplet = Triplet("192.0.2.0/24", "alice@sender.test", "bob@example.com")
            assert await plugin.store.lookup(triplet) is None
        finally:
            await plugin.aclose()

    run(scenario())
    assert DECISIONS[("greylist", "skip")] - before == 4


def options_relay() -> tuple[Any, ...]:
    return options_from_settings({}).relay_networks


def test_skips_are_logged_once_per_session_at_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    session = make_session("192.0.2.1", user="alice")

    async def scenario() -> None:
        plugin = make_plugin(tmp_path, clock)
        try:
            for index in range(3):
                assert await attempt(plugin, recipient=f"r{index}@x.test", session=session) is None
        finally:
            await plugin.aclose()

    with caplog.at_level(logging.DEBUG, logger="mailgate.policy"):
        run(scenario())
    levels = [r.levelno for r in caplog.records if getattr(r, "verdict", None) == "skip"]
    assert levels == [logging.INFO, logging.DEBUG, logging.DEBUG]
    assert "authenticated as alice" in caplog.records[0].getMessage()


def test_decisions_are_logged_with_the_triplet(
    tmp_path: Path, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        plugin = make_plugin(tmp_path, clock, backend)
        try:
            await attempt(plugin)
            clock.advance(DELAY + 12)
            await attempt(plugin)
        finally:
            await plugin.aclose()

    with caplog.at_level(logging.INFO, logger="mailgate.policy"):
        run(scenario())
    records = [r for r in caplog.records if getattr(r, "policy", None) == "greylist"]
    assert [r.verdict for r in records] == ["tempfail", "accept"]  # type: ignore[attr-defined]
    assert records[0].getMessage() == (
        "session t: policy greylist: tempfail (192.0.2.0/24 alice@sender.test -> "
        "bob@example.com: first attempt, wait 300 s)"
    )
    assert "retried after 312 s: passed" in records[1].getMessage()
    assert records[1].network == "192.0.2.0/24"  # type: ignore[attr-defined]
    assert records[1].recipient == "bob@example.com"  # type: ignore[attr-defined]


# --- the store -------------------------------------------------------------------------------


def test_state_survives_a_new_plugin_over_the_same_file(tmp_path: Path, backend: Backend) -> None:
    clock = FakeClock()

    async def first_life() -> None:
        plugin = make_plugin(tmp_path, clock, backend)
        try:
            assert await attempt(plugin, recipient="passed@example.com") is not None
            assert await attempt(plugin, recipient="waiting@example.com") is not None
            clock.advance(DELAY)
            assert await attempt(plugin, recipient="passed@example.com") is None
        finally:
            await plugin.aclose()

    async def second_life() -> None:
        plugin = make_plugin(tmp_path, clock, backend)
        try:
            assert await attempt(plugin, recipient="passed@example.com") is None
            assert await attempt(plugin, recipient="waiting@example.com") is None
            assert await attempt(plugin, recipient="new@example.com") is not None
        finally:
            await plugin.aclose()

    run(first_life())
    run(second_life())


def test_database_is_wal_owner_only_and_created_with_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "grey.sqlite3"
    store = GreylistStore(path)
    triplet = Triplet("192.0.2.0/24", "a@b.test", "c@d.test")

    async def scenario() -> None:
        try:
            await store.record(triplet, START)
            assert await store.lookup(triplet) == TripletState(START, START, None)
        finally:
            await store.aclose()

    run(scenario())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA user_version").fetchone() == (1,)
    finally:
        db.close()
    with pytest.raises(RuntimeError, match="closed"):
        run(store.lookup(triplet))


def test_two_stores_on_one_file_work_at_once(tmp_path: Path) -> None:
    """What --workers processes do: each has its own connection to the same file."""
    path = tmp_path / "grey.sqlite3"
    stores = [GreylistStore(path), GreylistStore(path)]

    async def worker(store: GreylistStore, number: int) -> None:
        for index in range(60):
            triplet = Triplet("192.0.2.0/24", f"s{index % 7}@x.test", f"r{index}@y.test")
            await store.record(triplet, START + index)
            await store.mark_passed(triplet, START + index + 1, client_since=START)
            assert (await store.lookup(triplet)) is not None

    async def scenario() -> None:
        try:
            await asyncio.gather(*(worker(store, n) for n, store in enumerate(stores)))
        finally:
            for store in stores:
                await store.aclose()

    run(scenario())
    assert len(rows(path)) == 60
    [(client, passed, _last)] = rows(path, "clients")
    assert client == "192.0.2.0/24"
    assert 60 <= passed <= 120  # a triplet counts once, whichever worker saw it pass first


WORKER = """
import asyncio, sys
from pathlib import Path
from mailgate.plugins.greylist_store import GreylistStore, Triplet

async def main(path, name):
    store = GreylistStore(Path(path))
    try:
        for index in range(150):
            triplet = Triplet("192.0.2.0/24", name, f"r{index}@example.com")
            await store.record(triplet, 1000.0 + index)
            assert await store.mark_passed(triplet, 1300.0 + index, client_since=0)
            assert (await store.lookup(triplet)).passed
    finally:
        await store.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_processes_share_the_file(tmp_path: Path) -> None:
    """--workers: separate processes create and write the same file at the same time
    (switching a new file to WAL races; the store retries)."""
    path = tmp_path / "grey.sqlite3"
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(path), f"w{n}@x.test"])
        for n in range(3)
    ]
    assert [worker.wait(timeout=20) for worker in workers] == [0, 0, 0]
    assert len(rows(path)) == 450
    assert rows(path, "clients")[0][1] == 450


def test_prune_removes_stale_and_expired_rows(tmp_path: Path) -> None:
    store = GreylistStore(tmp_path / "grey.sqlite3")
    old_waiting = Triplet("192.0.2.0/24", "a@x.test", "old-waiting@y.test")
    new_waiting = Triplet("192.0.2.0/24", "a@x.test", "new-waiting@y.test")
    old_passed = Triplet("192.0.2.0/24", "a@x.test", "old-passed@y.test")
    recent_passed = Triplet("198.51.100.0/24", "a@x.test", "recent-passed@y.test")

    async def scenario() -> int:
        try:
            now = START + 10 * EXPIRY
            await store.record(old_waiting, now - RETRY_WINDOW - 1)
            await store.record(new_waiting, now - RETRY_WINDOW + 1)
            await store.record(old_passed, now - EXPIRY - 100)
            await store.mark_passed(old_passed, now - EXPIRY - 1, client_since=0)
            await store.record(recent_passed, now - EXPIRY)
            await store.mark_passed(recent_passed, now - EXPIRY + 1, client_since=0)
            removed = await store.prune(now, retry_window=RETRY_WINDOW, expiry=EXPIRY)
            assert await store.lookup(old_waiting) is None
            assert await store.lookup(old_passed) is None
            assert await store.lookup(new_waiting) is not None
            assert await store.lookup(recent_passed) is not None
            assert await store.lookup_client("192.0.2.0/24") is None
            assert await store.lookup_client("198.51.100.0/24") is not None
            return removed
        finally:
            await store.aclose()

    assert run(scenario()) == 3  # two triplets and one client


def test_the_plugin_prunes_at_most_once_an_hour(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "grey.sqlite3"

    async def scenario() -> None:
        plugin = make_plugin(tmp_path, clock, retry_window=600)
        try:
            assert await attempt(plugin, recipient="a@example.com") is not None  # prunes (none)
            clock.advance(601)
            assert await attempt(plugin, recipient="b@example.com") is not None  # no prune
            await asyncio.sleep(0)
            assert plugin._prune_task is not None
            await plugin._prune_task
            assert len(rows(path)) == 2
            clock.advance(PRUNE_INTERVAL)
            assert await attempt(plugin, recipient="c@example.com") is not None  # prunes a, b
        finally:
            await plugin.aclose()  # waits for the prune

    run(scenario())
    assert [row[2] for row in rows(path)] == ["c@example.com"]


def test_an_unusable_database_path_fails_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where a directory should be\n")
    clock = FakeClock()
    before = DECISIONS[("greylist", "error")]

    async def scenario() -> None:
        plugin = make_plugin(tmp_path, clock, database=blocker / "grey.sqlite3")
        try:
            assert await attempt(plugin) is None
            assert await attempt(plugin) is None
        finally:
            await plugin.aclose()

    with caplog.at_level(logging.DEBUG, logger="mailgate.policy"):
        run(scenario())
    assert DECISIONS[("greylist", "error")] - before == 2
    errors = [r for r in caplog.records if getattr(r, "verdict", None) == "error"]
    # The first failure is a warning; repeats within a minute are only debug lines.
    assert [r.levelno for r in errors] == [logging.WARNING, logging.DEBUG]
    assert "greylisting store failed, let through" in errors[0].getMessage()
    assert errors[0].exc_info is None


def test_a_corrupt_database_fails_open_and_recovers_when_replaced(tmp_path: Path) -> None:
    path = tmp_path / "grey.sqlite3"
    path.write_bytes(b"this is not an SQLite database, not at all. " * 200)
    clock = FakeClock()
    before = DECISIONS[("greylist", "error")]

    async def scenario() -> None:
        plugin = make_plugin(tmp_path, clock, database=path)
        try:
            assert await attempt(plugin) is None  # let through
            path.unlink()  # the admin removes the broken file; the next request recreates it
            assert_greylisted(await attempt(plugin), 300)
        finally:
            await plugin.aclose()

    run(scenario())
    assert DECISIONS[("greylist", "error")] - before == 1


class HangingStore:
    """A backend that never answers a lookup (and counts how it was used)."""

    def __init__(self) -> None:
        self.closed = False

    async def lookup(self, triplet: Triplet) -> TripletState | None:
        await asyncio.sleep(60)
        return None

    async def record(self, triplet: Triplet, now: float) -> None:
        raise AssertionError("not reached")

    async def mark_passed(
        self, triplet: Triplet, now: float, *, client_since: float | None = None
    ) -> bool:
        raise AssertionError("not reached")

    async def lookup_client(self, client: str) -> ClientState | None:
        return None

    async def touch_client(self, client: str, now: float) -> None:
        raise AssertionError("not reached")

    async def prune(self, now: float, *, retry_window: float, expiry: float) -> int:
        return 0

    async def aclose(self) -> None:
        self.closed = True


def test_a_store_that_does_not_answer_in_time_fails_open() -> None:
    store = HangingStore()
    plugin = Greylist(store=store, timeout=0.2, auto_allow_after=3)

    async def scenario() -> None:
        try:
            started = time.monotonic()
            assert await attempt(plugin) is None
            assert time.monotonic() - started < 2
        finally:
            await plugin.aclose()

    run(scenario())
    assert store.closed


# --- configuration ---------------------------------------------------------------------------


def env_for(tmp_path: Path, **settings: Any) -> PolicyEnv:
    return PolicyEnv(options_from_settings({"state_dir": tmp_path, **settings}))


def test_no_greylisting_unless_asked(tmp_path: Path) -> None:
    assert plugins_from_options(env_for(tmp_path)) == []


def test_the_switch_alone_gives_the_defaults(tmp_path: Path) -> None:
    [plugin] = plugins_from_options(env_for(tmp_path, greylist=True))
    assert isinstance(plugin, Greylist)
    assert (plugin.delay, plugin.retry_window, plugin.expiry) == (300, 2 * 86400, 36 * 86400)
    assert (plugin.ipv4_prefix, plugin.ipv6_prefix, plugin.auto_allow_after) == (24, 64, 5)
    assert isinstance(plugin.store, GreylistStore)
    assert plugin.store.path == tmp_path / DEFAULT_DATABASE
    assert not (tmp_path / DEFAULT_DATABASE).exists()  # opened on first use only
    assert plugin.timeout == 10  # the store may take this long before the mail goes through
    [plugin] = plugins_from_options(env_for(tmp_path, greylist=True, hook_timeout=4))
    assert plugin.timeout == 2  # always well before the hook itself times out


def test_the_table_sets_every_key(tmp_path: Path) -> None:
    clock = FakeClock()
    options = options_from_settings(
        {
            "state_dir": tmp_path,
            "relay_networks": ["10.0.0.0/8"],
            "greylisting": {
                "delay": "1m",
                "retry_window": "12h",
                "expiry": 3 * 86400,
                "ipv4_prefix": 32,
                "ipv6_prefix": 56,
                "database": "sub/grey.db",
                "auto_allow_after": 0,
            },
        }
    )
    [plugin] = plugins_from_options(PolicyEnv(options, clock))
    assert (plugin.delay, plugin.retry_window, plugin.expiry) == (60, 43200, 259200)
    assert (plugin.ipv4_prefix, plugin.ipv6_prefix, plugin.auto_allow_after) == (32, 56, 0)
    assert plugin.store.path == tmp_path / "sub" / "grey.db"
    assert plugin.clock is clock
    assert [str(n) for n in plugin.relay_networks] == ["10.0.0.0/8"]
    absolute = tmp_path / "elsewhere.db"
    [plugin] = plugins_from_options(env_for(tmp_path, greylisting={"database": str(absolute)}))
    assert plugin.store.path == absolute


def test_a_toml_file(tmp_path: Path) -> None:
    config = tmp_path / "mailgate.toml"
    config.write_text(
        '[server]\nstate_dir = "state"\nsink = true\n\n'
        '[greylisting]\ndelay = "5m"\nexpiry = "36d"\ndatabase = "grey.sqlite3"\n'
    )
    options = build_options(argparse.Namespace(config=str(config)))
    [plugin] = plugins_from_options(PolicyEnv(options))
    assert plugin.delay == 300
    assert plugin.store.path == tmp_path / "state" / "grey.sqlite3"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"dealy": "5m"}, "setting [greylisting]: unknown key 'dealy' (did you mean 'delay'?)"),
        ({"delay": "soon"}, "setting [greylisting] delay: 'soon' is not a duration"),
        ({"expiry": -1}, "setting [greylisting] expiry: must not be negative"),
        ({"delay": "1h", "retry_window": "30m"}, "retry_window (1800 s) must be longer than"),
        ({"expiry": 0}, "expiry must be longer than 0 seconds"),
        ({"ipv4_prefix": 33}, "setting [greylisting] ipv4_prefix: must be 0 to 32, got 33"),
        ({"ipv6_prefix": 129}, "ipv6_prefix: must be 0 to 128"),
        ({"ipv4_prefix": "24"}, "ipv4_prefix: expected a whole number"),
        ({"auto_allow_after": -1}, "auto_allow_after: must be at least 0"),
        ({"database": ""}, "setting [greylisting] database: empty path"),
        ({"database": 5}, "database: expected a string"),
    ],
)
def test_configuration_errors(tmp_path: Path, table: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyConfigError) as error:
        plugins_from_options(env_for(tmp_path, greylisting=table))
    assert message in str(error.value)


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="retry_window"):
        Greylist(delay=10, retry_window=10)
    with pytest.raises(ValueError, match="ipv6_prefix"):
        Greylist(ipv6_prefix=200)
    with pytest.raises(ValueError, match="delay"):
        Greylist(delay=float("nan"))


def test_default_database_is_in_the_embedded_servers_default_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    plugin = Greylist()
    assert isinstance(plugin.store, GreylistStore)
    assert plugin.store.path == tmp_path / "mailgate" / DEFAULT_DATABASE
    assert plugin.store.path == options_from_settings({}).state_dir / DEFAULT_DATABASE
    assert not plugin.store.path.exists()  # made on first use


def test_the_plugin_does_not_load_the_configuration_reader(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from mailgate.plugins.greylist import Greylist\n"
        "Greylist()\n"
        "loaded = sorted(m for m in sys.modules if m == 'mailgate.config')\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# --- a real server ---------------------------------------------------------------------------

MESSAGE = "Subject: hello\r\n\r\nHi.\r\n"


def test_server_greylists_then_accepts_and_remembers_after_a_restart(tmp_path: Path) -> None:
    settings: dict[str, Any] = {
        "greylisting": {"delay": "1s", "retry_window": "1m", "expiry": "1h"},
        "local_domains": ["example.com"],
        "relay_networks": [],
        "state_dir": tmp_path,
    }
    with running_server(**settings) as srv:
        with smtplib.SMTP(srv.host, srv.port, source_address=("127.0.5.1", 0)) as client:
            client.ehlo("client.test")
            assert client.mail("alice@sender.test")[0] == 250
            code, text = client.rcpt("bob@example.com")
            assert (code, text) == (451, b"4.7.1 Greylisted, please try again in 1 second")
        time.sleep(1.2)
        with smtplib.SMTP(srv.host, srv.port, source_address=("127.0.5.2", 0)) as client:
            assert client.sendmail("alice@sender.test", ["bob@example.com"], MESSAGE) == {}
        [message] = srv.messages.wait(1)
        assert message.rcpt_tos == ["bob@example.com"]
    assert (tmp_path / DEFAULT_DATABASE).exists()
    with running_server(**settings) as srv:  # a new server over the same state directory
        with smtplib.SMTP(srv.host, srv.port, source_address=("127.0.5.3", 0)) as client:
            assert client.sendmail("alice@sender.test", ["bob@example.com"], MESSAGE) == {}
            client.ehlo("client.test")
            assert client.mail("alice@sender.test")[0] == 250
            assert client.rcpt("carol@example.com")[0] == 451  # another triplet
        srv.messages.wait(1)


def test_server_lets_authenticated_clients_through(tmp_path: Path) -> None:
    with running_server(
        greylisting={"delay": "1s"},
        local_domains=["example.com"],
        relay_networks=[],
        state_dir=tmp_path,
        auth_users=["alice:secret"],
        allow_insecure_auth=True,
    ) as srv:
        with smtplib.SMTP(srv.host, srv.port, source_address=("127.0.5.4", 0)) as client:
            client.ehlo("client.test")
            client.login("alice", "secret")
            assert client.sendmail("alice@sender.test", ["bob@example.com"], MESSAGE) == {}
        srv.messages.wait(1)
        with smtplib.SMTP(srv.host, srv.port, source_address=("127.0.5.4", 0)) as client:
            client.ehlo("client.test")
            assert client.mail("alice@sender.test")[0] == 250
            assert client.rcpt("bob@example.com")[0] == 451  # the same client, not logged in


def test_server_lets_relay_networks_through(tmp_path: Path) -> None:
    # relay_networks left at its default: loopback, so 127.0.5.5 is one of ours.
    with running_server(
        greylisting={"delay": "1s"}, local_domains=["example.com"], state_dir=tmp_path
    ) as srv:
        with smtplib.SMTP(srv.host, srv.port, source_address=("127.0.5.5", 0)) as client:
            assert client.sendmail("alice@sender.test", ["bob@example.com"], MESSAGE) == {}
        srv.messages.wait(1)


def test_server_with_the_greylist_switch(tmp_path: Path) -> None:
    with running_server(
        greylist=True, local_domains=["example.com"], relay_networks=[], state_dir=tmp_path
    ) as srv:
        with smtplib.SMTP(srv.host, srv.port, source_address=("127.0.5.6", 0)) as client:
            client.ehlo("client.test")
            assert client.mail("<>")[0] == 250
            code, text = client.rcpt("bob@example.com")
            assert (code, text) == (451, b"4.7.1 Greylisted, please try again in 300 seconds")
    assert rows(tmp_path / DEFAULT_DATABASE)[0][:3] == ("127.0.5.0/24", "<>", "bob@example.com")
