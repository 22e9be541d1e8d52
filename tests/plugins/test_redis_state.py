"""Policy state shared through Redis ([state] backend = "redis"): real mailgate servers
sharing one real redis-server (tests/redis_server.py) count one per-IP limit together,
share greylisting triplets and the honeypot's per-address counts; a Redis that is down,
refuses connections or never answers makes the policies fail open (or closed, 4xx)
within the timeout, logged once per outage and once when it answers again.

The store tests themselves (GCRA, triplets) run on both backends in test_rate_limits.py
and test_greylist.py. Clients come from 127.0.19.0/24 (reserved for this file)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.redis_server import PrivateRedis, free_port

import mailgate
from mailgate.hooks import AuthAttempt, Session, TempFail
from mailgate.plugins.counters import MemoryCounters
from mailgate.plugins.policy import PolicyConfigError, PolicyEnv
from mailgate.plugins.redis_state import (
    MAX_BACKOFF,
    RedisAddressCounts,
    RedisCounters,
    RedisGreylistStore,
    RedisState,
)
from mailgate.plugins.state import StateSettings, StateUnavailable, redacted_url, state_settings
from mailgate.server.options import PolicySection, ServerOptions
from mailgate.settings import ConfigError
from mailgate.testing import running_server

MESSAGE = b"Subject: shared\r\n\r\nhello\r\n"
CLIENT = "127.0.19.1"
#: The state log's lines about an outage starting and ending.
DOWN = "failed ("
BACK = "answers again after"


@pytest.fixture
def smtp() -> Iterator[list[smtplib.SMTP]]:
    clients: list[smtplib.SMTP] = []
    yield clients
    for client in clients:
        with contextlib.suppress(OSError):
            client.close()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of this test's own, to stop and start (an outage)."""
    server = PrivateRedis.start()
    yield server
    server.stop()


class SilentServer:
    """A TCP listener on 127.0.0.1 that accepts connections, reads what comes and never
    answers: a Redis that hangs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.connections = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(OSError):
            while await reader.read(4096):
                pass
        writer.close()

    def __enter__(self) -> SilentServer:
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def connect(srv: Any, clients: list[smtplib.SMTP], source: str = CLIENT) -> smtplib.SMTP:
    client = smtplib.SMTP(srv.host, srv.port, source_address=(source, 0), timeout=10)
    clients.append(client)
    return client


def state(url: str, prefix: str = "mailgate-test:", **more: Any) -> dict[str, Any]:
    return {"backend": "redis", "url": url, "key_prefix": prefix, **more}


def send(client: smtplib.SMTP) -> int:
    """One message on an open session: 250, or the code DATA was refused with."""
    try:
        client.sendmail("a@sender.example", ["u@example.com"], MESSAGE)
    except smtplib.SMTPDataError as exc:
        client.rset()
        return exc.smtp_code
    return 250


def child_env() -> dict[str, str]:
    """The environment of a child Python: this tree's mailgate first on its path."""
    source = str(Path(mailgate.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}


def outage_lines(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "mailgate.state" and words in r.getMessage()
    ]


# --- several servers, one Redis --------------------------------------------------------------


def test_two_servers_share_one_per_ip_limit(
    redis_url: str, redis_prefix: str, smtp: list[smtplib.SMTP]
) -> None:
    settings: dict[str, Any] = {
        "limits": {"messages_per_ip": "5/1h"},
        "state": state(redis_url, redis_prefix),
    }
    with running_server(**settings) as one, running_server(**settings) as two:
        first, second = connect(one, smtp), connect(two, smtp)
        codes = [send(first if turn % 2 == 0 else second) for turn in range(10)]
        assert codes == [250] * 5 + [450] * 5  # 5 in total, not 5 per server
        assert len(one.messages) + len(two.messages) == 5
        # Another client has its own count, on either server.
        assert send(connect(two, smtp, "127.0.19.2")) == 250


def test_two_servers_share_connections_per_ip(
    redis_url: str, redis_prefix: str, smtp: list[smtplib.SMTP]
) -> None:
    settings: dict[str, Any] = {
        "limits": {"connections_per_ip": "3/1h"},
        "state": state(redis_url, redis_prefix),
    }
    with running_server(**settings) as one, running_server(**settings) as two:
        for server in (one, two, one):
            assert connect(server, smtp).noop()[0] == 250
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            connect(two, smtp)
        assert refused.value.smtp_code == 421


def test_a_triplet_greylisted_on_one_server_passes_on_the_other(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    settings: dict[str, Any] = {
        "greylisting": {"delay": "1s", "retry_window": "1m", "expiry": "1h"},
        "local_domains": ["example.com"],
        "relay_networks": [],
        "state": state(redis_url, redis_prefix),
    }
    with (
        running_server(**settings, state_dir=tmp_path / "a") as one,
        running_server(**settings, state_dir=tmp_path / "b") as two,
    ):
        with smtplib.SMTP(one.host, one.port, source_address=(CLIENT, 0)) as client:
            client.ehlo("client.test")
            assert client.mail("alice@sender.test")[0] == 250
            code, text = client.rcpt("bob@example.com")
            assert (code, text) == (451, b"4.7.1 Greylisted, please try again in 1 second")
        with smtplib.SMTP(two.host, two.port, source_address=("127.0.19.9", 0)) as client:
            client.ehlo("client.test")
            assert client.mail("alice@sender.test")[0] == 250
            assert client.rcpt("bob@example.com")[0] == 451  # known on B too: still waiting
        time.sleep(1.1)
        with smtplib.SMTP(two.host, two.port, source_address=("127.0.19.8", 0)) as client:
            assert client.sendmail("alice@sender.test", ["bob@example.com"], MESSAGE) == {}
        two.messages.wait(1)
    # Neither server wrote a SQLite greylist: the state is in Redis only.
    assert not list(tmp_path.rglob("greylist.sqlite3"))


# --- Redis failing ---------------------------------------------------------------------------


def test_redis_going_down_fails_open_logged_once_and_recovers(
    private_redis: PrivateRedis, smtp: list[smtplib.SMTP], caplog: pytest.LogCaptureFixture
) -> None:
    settings: dict[str, Any] = {
        "limits": {"messages_per_ip": "2/1h"},
        "state": state(private_redis.url),
    }
    caplog.set_level(logging.INFO, logger="mailgate.state")
    with running_server(**settings) as srv:
        client = connect(srv, smtp)
        assert [send(client) for _ in range(3)] == [250, 250, 450]
        private_redis.pause()
        started = time.monotonic()
        # Not counted while Redis is gone: nothing refused, nobody waits.
        assert [send(client) for _ in range(5)] == [250] * 5
        assert time.monotonic() - started < 3.0
        assert len(outage_lines(caplog, DOWN)) == 1
        assert "fail open" in outage_lines(caplog, DOWN)[0]
        private_redis.restart()  # empty: the counts start over
        deadline = time.monotonic() + MAX_BACKOFF + 3
        other = connect(srv, smtp, "127.0.19.3")
        while not outage_lines(caplog, BACK) and time.monotonic() < deadline:
            assert send(other) == 250
            time.sleep(0.1)
        assert len(outage_lines(caplog, BACK)) == 1
        assert len(outage_lines(caplog, DOWN)) == 1  # still one line for the one outage
        fresh = connect(srv, smtp, "127.0.19.4")
        assert [send(fresh) for _ in range(3)] == [250, 250, 450]  # counted again


def test_a_closed_port_fails_closed_with_4xx_when_asked(smtp: list[smtplib.SMTP]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings: dict[str, Any] = {
        "limits": {"messages_per_ip": "100/1h", "recipients_per_ip": "100/1h"},
        "state": state(url, on_error="closed"),
    }
    with running_server(**settings) as srv:
        client = connect(srv, smtp)
        client.ehlo()
        assert client.mail("a@sender.example")[0] == 250
        code, text = client.rcpt("u@example.com")
        assert (code, text) == (451, b"4.3.0 Temporary policy failure, try again later")
        client.quit()  # no transaction left in flight for the server's stop to wait for
        assert len(srv.messages) == 0
    closed = {"limits": {"connections_per_ip": "100/1h"}, "state": state(url, on_error="closed")}
    with running_server(**closed) as srv:
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            connect(srv, smtp)
        assert refused.value.smtp_code == 421


def test_a_redis_that_never_answers_costs_the_timeout_at_most(
    smtp: list[smtplib.SMTP], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailgate.state")
    with SilentServer() as silent:
        settings: dict[str, Any] = {
            "limits": {"connections_per_ip": "1/1h", "messages_per_ip": "1/1h"},
            "state": state(silent.url, timeout=0.2),
        }
        with running_server(**settings) as srv:
            started = time.monotonic()
            client = connect(srv, smtp)
            assert [send(client) for _ in range(4)] == [250] * 4  # open: limits not applied
            assert connect(srv, smtp).noop()[0] == 250
            elapsed = time.monotonic() - started
            assert elapsed < 2.0, elapsed  # one timeout, then the back-off answers at once
            assert silent.connections >= 1  # it was really asked
        assert len(outage_lines(caplog, DOWN)) == 1
        assert "no answer within 0.2 s" in outage_lines(caplog, DOWN)[0]
        closed = {**settings, "state": state(silent.url, timeout=0.2, on_error="closed")}
        del closed["limits"]["connections_per_ip"]
        with running_server(**closed) as srv:
            client = connect(srv, smtp)
            started = time.monotonic()
            assert send(client) == 451
            assert time.monotonic() - started < 1.5


def test_state_unavailable_at_once_during_the_back_off(private_redis: PrivateRedis) -> None:
    async def scenario() -> None:
        state_ = RedisState(private_redis.url, timeout=0.5, fail_closed=True)
        counters = RedisCounters(state_)
        assert (await counters.hit("k", 2, 60.0)).allowed
        private_redis.pause()
        with pytest.raises(StateUnavailable) as first:
            await counters.hit("k", 2, 60.0)
        assert first.value.fail_closed
        started = time.monotonic()
        with pytest.raises(StateUnavailable, match="unavailable for"):
            await counters.hit("k", 2, 60.0)
        assert time.monotonic() - started < 0.05
        assert not state_.available and state_.outages == 1
        await counters.aclose()

    asyncio.run(scenario())


def test_several_limits_count_all_or_none_like_the_memory_store(
    redis_url: str, redis_prefix: str
) -> None:
    """RedisCounters.hit_all (one script) answers as the plugin's look-then-count over
    MemoryCounters does, step for step, on a fake clock."""
    now = [1_000_000.0]
    limits = [
        ("messages_per_ip:192.0.2.1", 3, 60.0),
        ("messages_per_sender_domain:x.test", 5, 90.0),
    ]

    async def scenario() -> None:
        redis_store = RedisCounters(
            RedisState(redis_url, timeout=5.0, key_prefix=redis_prefix), clock=lambda: now[0]
        )
        memory = MemoryCounters(clock=lambda: now[0])
        try:
            for step in range(60):
                subset = limits if step % 3 else limits[1:]
                got = await redis_store.hit_all(subset)
                peeks = [memory.take(k, n, w, consume=False) for k, n, w in subset]
                if all(p.allowed for p in peeks):
                    want = [memory.take(k, n, w) for k, n, w in subset]
                else:
                    want = peeks
                assert [(r.allowed, r.remaining) for r in got] == [
                    (r.allowed, r.remaining) for r in want
                ], step
                assert [r.retry_after for r in got] == pytest.approx([r.retry_after for r in want])
                now[0] += (7.0, 0.0, 2.5, 31.0)[step % 4]
        finally:
            await redis_store.aclose()

    asyncio.run(scenario())


def test_a_message_over_the_domain_limit_is_not_counted_against_the_client(
    redis_url: str, redis_prefix: str, smtp: list[smtplib.SMTP]
) -> None:
    settings: dict[str, Any] = {
        "limits": {"messages_per_ip": "3/1h", "messages_per_sender_domain": "1/1h"},
        "state": state(redis_url, redis_prefix),
    }
    with running_server(**settings) as srv:
        client = connect(srv, smtp)
        assert [send(client) for _ in range(3)] == [250, 450, 450]
        client.sendmail("b@other.example", ["u@example.com"], MESSAGE)  # 2 of 3 for the IP
        client.sendmail("c@third.example", ["u@example.com"], MESSAGE)  # 3 of 3
        assert send(client) == 450


# --- the honeypot ----------------------------------------------------------------------------


def honeypot_session(sid: str, ip: str = "192.0.2.66") -> Session:
    return Session(id=sid, peer_host=ip, peer_port=1, local_host="127.0.0.1", local_port=25)


def test_honeypot_nodes_share_counts_per_address(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    from mailgate.honeypot.plugin import HoneypotPlugin
    from mailgate.honeypot.store import CaptureStore

    async def scenario() -> None:
        nodes = [
            HoneypotPlugin(
                CaptureStore(tmp_path / name, batch_seconds=0.01),
                auth_outcome="accept-after:3",
                tarpit=0.01,
                address_counts=RedisAddressCounts(
                    RedisState(redis_url, timeout=5.0, key_prefix=redis_prefix)
                ),
            )
            for name in ("a", "b")
        ]
        a, b = nodes
        try:
            for index, node in enumerate((a, b, a)):
                await node.on_connect(honeypot_session(f"c{index}"))
            assert b.delay("192.0.2.66") == pytest.approx(0.02)  # b counted the 2nd
            await b.on_connect(honeypot_session("c3"))
            assert b.delay("192.0.2.66") == pytest.approx(0.04)  # 4 over both nodes
            attempt = AuthAttempt(method="PLAIN", username="root", password="x")
            outcomes = [
                await node.on_auth(honeypot_session(f"s{index}"), attempt)
                for index, node in enumerate((a, b, a))
            ]
            assert outcomes == [None, None, True]  # the third attempt over both nodes
            assert await b.on_auth(honeypot_session("s3", "192.0.2.67"), attempt) is None
        finally:
            for node in nodes:
                await node.aclose()

    asyncio.run(scenario())


def test_honeypot_counts_here_when_redis_is_gone_or_refuses_when_closed(
    tmp_path: Path,
) -> None:
    from mailgate.honeypot.plugin import HoneypotPlugin
    from mailgate.honeypot.store import CaptureStore

    url = f"redis://127.0.0.1:{free_port()}/0"

    async def scenario() -> None:
        open_node = HoneypotPlugin(
            CaptureStore(tmp_path / "open", batch_seconds=0.01),
            auth_outcome="accept-after:2",
            address_counts=RedisAddressCounts(RedisState(url)),
        )
        closed_node = HoneypotPlugin(
            CaptureStore(tmp_path / "closed", batch_seconds=0.01),
            address_counts=RedisAddressCounts(RedisState(url, fail_closed=True)),
        )
        try:
            attempt = AuthAttempt(method="PLAIN", username="root", password="x")
            results = [await open_node.on_auth(honeypot_session(f"o{i}"), attempt) for i in (1, 2)]
            assert results == [None, True]  # counted in this process meanwhile
            with pytest.raises(TempFail) as refused:
                await closed_node.on_connect(honeypot_session("c1"))
            assert (refused.value.code, refused.value.disconnect) == (421, True)
        finally:
            await open_node.aclose()
            await closed_node.aclose()

    asyncio.run(scenario())


def test_honeypot_mode_counts_in_redis_with_a_state_table(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    from mailgate.honeypot.mode import build_server
    from mailgate.honeypot.settings import HoneypotOptions

    table = PolicySection("state", state(redis_url, redis_prefix), None, "hp.toml [state]")
    limits = PolicySection("limits", {"messages_per_ip": "5/1h"}, None, "hp.toml [limits]")
    server = build_server(
        ServerOptions(policy=(table, limits)), HoneypotOptions(data_dir=tmp_path / "d")
    )
    try:
        assert isinstance(server.plugin.address_counts, RedisAddressCounts)
        [rate] = [p for p in server.hooks.plugins() if getattr(p, "name", "") == "rate-limits"]
        assert isinstance(rate.store, RedisCounters)
        # One connection to Redis for both: one outage, one log line.
        assert rate.store.state is server.plugin.address_counts.state
    finally:
        server.store.close()


# --- settings --------------------------------------------------------------------------------


def section(**values: Any) -> PolicySection:
    return PolicySection("state", values, None, "mailgate.toml [state]")


def test_state_table_defaults_and_values() -> None:
    assert state_settings(()) == StateSettings()
    assert StateSettings().backend == "memory" and StateSettings().timeout == 0.25
    settings = state_settings(
        [section(backend="redis", url="redis://:pw@h:6379/2", on_error="closed", timeout=0.1)]
    )
    assert settings.fail_closed and settings.timeout == 0.1
    assert "pw" not in repr(settings) and "***" in repr(settings)
    assert redacted_url("redis://user:secret@h/0") == "redis://user:***@h/0"
    env = PolicyEnv(ServerOptions(policy=(section(backend="redis", url="redis://h:1/0"),)))
    shared = env.shared_state()
    assert isinstance(shared, RedisState) and env.shared_state() is shared
    assert PolicyEnv(ServerOptions()).shared_state() is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"backend": "redis"}, 'url: required with backend = "redis"'),
        ({"backend": "valkey"}, "backend"),
        ({"url": "http://h/"}, "expected a URL such as redis://"),
        ({"timeout": 0}, "timeout"),
        ({"on_error": "ignore"}, "on_error"),
        ({"on_eror": "open"}, "did you mean 'on_error'"),
        ({"key_prefix": "a b"}, "must not contain spaces"),
    ],
)
def test_state_table_errors_say_where(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=r"mailgate.toml \[state\]") as error:
        state_settings([section(**values)])
    assert message in str(error.value)
    env = PolicyEnv(ServerOptions(policy=(section(**values),)))
    with pytest.raises(PolicyConfigError):
        env.shared_state()


def test_without_redis_py_the_error_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from mailgate.plugins.state import state_settings\n"
        "from mailgate.server.options import PolicySection\n"
        "from mailgate.settings import ConfigError\n"
        "values = {'backend': 'redis', 'url': 'redis://h/0'}\n"
        "try:\n"
        "    state_settings([PolicySection('state', values, None, 'x')])\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=child_env(),
    )
    assert result.stdout.strip() == (
        '[state] backend = "redis" needs redis-py: pip install "mailgate[redis]"'
    )


def test_greylist_store_keys_share_the_client_hash_tag(redis_url: str, redis_prefix: str) -> None:
    store = RedisGreylistStore(
        RedisState(redis_url, key_prefix=redis_prefix), retry_window=60, expiry=3600
    )
    triplet_prefix, client_key = store._keys("192.0.2.0/24")
    assert "{192.0.2.0/24}" in triplet_prefix and "{192.0.2.0/24}" in client_key
    asyncio.run(store.aclose())


def test_a_timeout_not_well_under_hook_timeout_is_refused() -> None:
    values = {"backend": "redis", "url": "redis://h/0", "timeout": 10}
    with pytest.raises(ConfigError, match=r"timeout: 10 s is not well under hook_timeout"):
        state_settings([section(**values)], hook_timeout=30)
    env = PolicyEnv(ServerOptions(hook_timeout=45, policy=(section(**values),)))
    assert env.shared_state() is not None  # 4 x 10 s fit in 45 s


def test_check_config_names_the_shared_store(tmp_path: Path) -> None:
    config = tmp_path / "mailgate.toml"
    config.write_text(
        '[server]\nlisten = "127.0.0.1:0"\n[limits]\nmessages_per_ip = "5/1h"\n'
        '[state]\nbackend = "redis"\nurl = "redis://:secret@127.0.0.1:6399/0"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "mailgate", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=child_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "shared state: Redis at redis://:***@127.0.0.1:6399/0 (timeout 0.25 s, fails open)" in (
        result.stdout
    )
    assert "secret" not in result.stdout + result.stderr


@pytest.mark.slow
def test_worker_processes_count_together(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    """``mailgate serve --workers 2`` with [state] on Redis: each forked worker makes its
    own client, and the two count one limit between them."""
    from tests.server.harness import CLIServer

    config = tmp_path / "mailgate.toml"
    server = None
    for _ in range(5):  # another port when something took the chosen one meanwhile
        port = free_port()
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:{port}"\nhostname = "mx.test"\n'
            f'local_domains = ["example.com"]\nmaildir = "{tmp_path / "maildir"}"\n'
            f'state_dir = "{tmp_path / "state"}"\nworkers = 2\nlog_format = "json"\n'
            '[limits]\nmessages_per_ip = "10/1h"\n'
            f'[state]\nbackend = "redis"\nurl = "{redis_url}"\nkey_prefix = "{redis_prefix}"\n'
        )
        candidate = CLIServer(["--config", str(config)], tmp_path, env=child_env())
        candidate.start(expected_listeners=2)
        if len(candidate.ports) >= 2:
            server = candidate
            break
        candidate.kill()
    assert server is not None, "no free port"
    try:
        codes = []
        for _ in range(30):  # a connection each: the kernel picks the worker
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                try:
                    client.sendmail("a@sender.example", ["u@example.com"], MESSAGE)
                    codes.append(250)
                except smtplib.SMTPDataError as exc:
                    codes.append(exc.smtp_code)
        assert codes == [250] * 10 + [450] * 20
        assert server.stop() == 0
    finally:
        server.kill()
    records = [json.loads(line) for line in server.log if line.startswith("{")]
    accepting = {r["pid"] for r in records if " accepted " in str(r["msg"])}
    refusing = {r["pid"] for r in records if "messages_per_ip 10/1h exceeded" in str(r["msg"])}
    assert len(accepting | refusing) == 2, "both workers should have taken connections"
