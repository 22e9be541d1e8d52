"""Three mailgate nodes behind HAProxy, as docs/scaling.md deploys them, all real:

* HAProxy (Debian's ``haproxy``) in TCP mode with ``send-proxy-v2`` in front of three
  ``python -m mailgate serve`` processes, which take the PROXY header from HAProxy's
  address only (``proxy_protocol``);
* one PostgreSQL queue (the suite's private cluster), one Redis (the suite's private
  redis-server) counting a per-IP rate limit for all three, one receiving SMTP server
  on 127.0.0.x that counts Message-IDs and the transactions each node has open;
* a per-IP limit of N messages admits N from one client over the three nodes, not N
  per node;
* 1,000 messages submitted through HAProxy by clients on four 127.0.0.x addresses,
  which the nodes' logs must show (not HAProxy's address);
* one node is frozen then killed (SIGKILL) while it holds leases on slow deliveries:
  the others deliver its messages; every acknowledged message arrives at least once,
  and the duplicates are no more than the killed node's deliveries in flight;
* HAProxy's health checks (SMTP EHLO after a PROXY header) take the dead node out:
  new clients after the kill are all served.

The numbers (acceptance and delivery times, leases held by the killed node, duplicates)
are printed; ``pytest -s`` shows them.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from tests.dns_server import DNSTestServer
from tests.outbound.helpers import new_domain, publish_mx
from tests.outbound.receivers import free_port

pytest.importorskip("asyncpg")
pytestmark = pytest.mark.slow

HAPROXY_ADDRESS = "127.0.0.90"
NODE_ADDRESSES = ("127.0.0.91", "127.0.0.92", "127.0.0.93")
RECEIVER_ADDRESS = "127.0.0.94"
CLIENT_ADDRESSES = ("127.0.0.101", "127.0.0.102", "127.0.0.103", "127.0.0.104")
MESSAGES = 1000
PER_CONNECTION = 10
CLIENT_CONCURRENCY = 12
NODE_MAX_DELIVERIES = 15
#: messages_per_ip of every node, shared through Redis; each client address sends
#: MESSAGES / 4 = 250 first, then the first one LIMIT_ATTEMPTS more.
RATE_LIMIT = 300
LIMIT_ATTEMPTS = 90
ROOT = Path(__file__).resolve().parents[2]


# --- the receiving server -------------------------------------------------------------------


class CountingReceiver:
    """An aiosmtpd server (own thread) that counts each Message-ID it accepted and the
    transactions open per client HELO name (each node says its own name)."""

    def __init__(self, host: str, port: int) -> None:
        self.lock = threading.Lock()
        self.delivered: collections.Counter[str] = collections.Counter()
        self.by_node: collections.Counter[str] = collections.Counter()
        self.active: collections.Counter[str] = collections.Counter()
        self.delay = 0.0
        self.controller = Controller(self, hostname=host, port=port, ready_timeout=10)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # Like a real MTA: the message is taken (counted) at the end of DATA, and the
        # 250 comes after ``delay``. A sender that dies meanwhile never hears it and
        # its queue sends the message again: the duplicates this test bounds.
        helo = str(session.host_name)
        data = bytes(envelope.original_content or b"")
        found = re.search(rb"^Message-ID:\s*<([^>]+)>", data, re.MULTILINE | re.IGNORECASE)
        with self.lock:
            self.delivered[found.group(1).decode() if found else "?"] += 1
            self.by_node[helo] += 1
            self.active[helo] += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            with self.lock:
                self.active[helo] -= 1
        return "250 2.0.0 Ok"

    def __enter__(self) -> CountingReceiver:
        self.controller.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.controller.stop()


# --- processes ------------------------------------------------------------------------------


def _haproxy_config(port: int, node_ports: list[int]) -> str:
    servers = "\n".join(
        f"    server node{n} {address}:{node_port} send-proxy-v2 "
        "check check-send-proxy inter 500ms fall 2 rise 2"
        for n, (address, node_port) in enumerate(zip(NODE_ADDRESSES, node_ports, strict=True))
    )
    return f"""\
global
    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend smtp
    bind {HAPROXY_ADDRESS}:{port}
    default_backend nodes
backend nodes
    balance roundrobin
    source {HAPROXY_ADDRESS}
    option smtpchk EHLO haproxy.test
{servers}
"""


def _node_config(
    directory: Path,
    name: str,
    address: str,
    port: int,
    *,
    dsn: str,
    schema: str,
    dns: DNSTestServer,
    mx_port: int,
    extra: str,
) -> str:
    return f"""\
[server]
hostname = "{name}.mailgate.test"
listen = "{address}:{port}"
state_dir = "{directory}"
proxy_protocol = ["{HAPROXY_ADDRESS}/32"]
relay_networks = ["127.0.0.0/8"]
log_format = "json"
dns_nameservers = ["{dns.address}"]
dns_timeout = 2

[queue]
backend = "postgresql"
dsn = "{dsn}"
schema = "{schema}"
retry_schedule = ["1s"]
max_deliveries = {NODE_MAX_DELIVERIES}

[outbound]
port = {mx_port}
helo = "{name}.mailgate.test"
connect_timeout = 5
data_timeout = 30
dead_after_failures = 1000

[[routes]]
recipients = ["*"]
action = "relay"
{extra}"""


def _wait_for_banner(address: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    last: object = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"node on {address} exited: {log.read_text()[-3000:]}")
        try:
            # From 127.0.0.1, not HAProxy's address: a node that is up says it takes
            # connections through the proxy only.
            with socket.create_connection(
                (address, port), timeout=2, source_address=("127.0.0.1", 0)
            ) as sock:
                last = sock.recv(64)
                if last.startswith(b"421 Connections must come through the proxy"):
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(
        f"node on {address}:{port} did not start ({last!r}): {log.read_text()[-3000:]}"
    )


# --- the clients ----------------------------------------------------------------------------


async def _submit(
    proxy_port: int, domain: str, run_id: str
) -> tuple[set[str], list[str], dict[str, str]]:
    """Send MESSAGES messages through HAProxy, PER_CONNECTION per connection, at most
    CLIENT_CONCURRENCY connections at once, each from one of CLIENT_ADDRESSES. Returns
    the acknowledged Message-IDs, the failures, and the client address of each id."""
    acknowledged: set[str] = set()
    failures: list[str] = []
    source_of: dict[str, str] = {}
    gate = asyncio.Semaphore(CLIENT_CONCURRENCY)

    async def connection(number: int) -> None:
        source = CLIENT_ADDRESSES[number % len(CLIENT_ADDRESSES)]
        async with gate:
            smtp = aiosmtplib.SMTP(
                hostname=HAPROXY_ADDRESS,
                port=proxy_port,
                source_address=(source, 0),
                start_tls=False,
                timeout=30,
                local_hostname="client.test",
            )
            try:
                await smtp.connect()
                for index in range(PER_CONNECTION):
                    serial = number * PER_CONNECTION + index
                    message_id = f"{run_id}.{serial}@client.test"
                    data = (
                        f"From: <load@client.test>\r\nTo: <rcpt{serial}@{domain}>\r\n"
                        f"Subject: message {serial}\r\nMessage-ID: <{message_id}>\r\n\r\n"
                        f"body {serial}\r\n"
                    ).encode()
                    answer = await smtp.sendmail(
                        "load@client.test", [f"rcpt{serial}@{domain}"], data
                    )
                    acknowledged.add(message_id)
                    source_of[message_id] = source
                    del answer
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError) as exc:
                failures.append(f"connection {number} from {source}: {exc!r}")
                smtp.close()

    await asyncio.gather(*(connection(n) for n in range(MESSAGES // PER_CONNECTION)))
    return acknowledged, failures, source_of


async def _rate_limited(
    proxy_port: int, domain: str, run_id: str, source: str, attempts: int
) -> tuple[set[str], list[int]]:
    """``attempts`` more messages from ``source``, one connection each (HAProxy spreads
    them over the nodes); the acknowledged ids and the codes of the refusals."""
    accepted: set[str] = set()
    refused: list[int] = []
    gate = asyncio.Semaphore(6)

    async def one(serial: int) -> None:
        message_id = f"{run_id}.limited{serial}@client.test"
        data = (
            f"From: <load@client.test>\r\nTo: <limited{serial}@{domain}>\r\n"
            f"Subject: limited {serial}\r\nMessage-ID: <{message_id}>\r\n\r\nbody\r\n"
        ).encode()
        async with gate:
            smtp = aiosmtplib.SMTP(
                hostname=HAPROXY_ADDRESS,
                port=proxy_port,
                source_address=(source, 0),
                start_tls=False,
                timeout=30,
                local_hostname="client.test",
            )
            await smtp.connect()
            try:
                await smtp.sendmail("load@client.test", [f"limited{serial}@{domain}"], data)
                accepted.add(message_id)
            except aiosmtplib.SMTPResponseException as exc:
                refused.append(exc.code)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                refused.extend(error.code for error in exc.recipients)
            finally:
                smtp.close()

    await asyncio.gather(*(one(serial) for serial in range(attempts)))
    return accepted, refused


async def _leases_of(dsn: str, schema: str, pid: int) -> int:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        return int(
            await connection.fetchval(
                f'SELECT count(*) FROM "{schema}".recipients WHERE lease_owner LIKE $1',
                f"%:{pid}:%",
            )
        )
    finally:
        await connection.close()


async def _pending(dsn: str, schema: str) -> int:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        return int(
            await connection.fetchval(
                f'SELECT count(*) FROM "{schema}".recipients '
                "WHERE state IN ('queued', 'deferred')"
            )
        )
    finally:
        await connection.close()


async def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await connection.close()


@pytest.fixture
def haproxy() -> str:
    path = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.path.exists(p)), None
    )
    if path is None:
        pytest.skip("haproxy is not installed (scripts/install-test-deps installs it)")
    return path


@pytest.fixture
def schema(postgres_dsn: str) -> Iterator[str]:
    name = f"q_haproxy_{secrets.token_hex(4)}"
    yield name
    asyncio.run(_drop_schema(postgres_dsn, name))


def test_three_nodes_behind_haproxy_survive_a_killed_node(
    tmp_path: Path,
    haproxy: str,
    postgres_dsn: str,
    schema: str,
    dns_server: DNSTestServer,
    redis_url: str,
    redis_prefix: str,
) -> None:
    pytest.importorskip("redis")
    started = time.monotonic()
    mx_port = free_port(range(90, 105))
    domain = new_domain("haproxy")
    publish_mx(dns_server, domain, (10, "mx", RECEIVER_ADDRESS))
    run_id = secrets.token_hex(4)
    node_ports = [free_port(range(90, 94)) for _ in NODE_ADDRESSES]
    proxy_port = free_port(range(90, 91))
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    environment = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    stats: dict[str, Any] = {}
    # One per-IP limit for the three nodes, counted in Redis: a client gets RATE_LIMIT
    # messages in all, not RATE_LIMIT per node. A day's window: nothing refills meanwhile.
    shared_state = (
        f'\n[limits]\nmessages_per_ip = "{RATE_LIMIT}/1d"\n'
        f'\n[state]\nbackend = "redis"\nurl = "{redis_url}"\nkey_prefix = "{redis_prefix}"\n'
    )

    with CountingReceiver(RECEIVER_ADDRESS, mx_port) as receiver:
        try:
            for n, (address, port) in enumerate(zip(NODE_ADDRESSES, node_ports, strict=True)):
                directory = tmp_path / f"node{n}"
                directory.mkdir()
                config = directory / "mailgate.toml"
                config.write_text(
                    _node_config(
                        directory,
                        f"node{n}",
                        address,
                        port,
                        dsn=postgres_dsn,
                        schema=schema,
                        dns=dns_server,
                        mx_port=mx_port,
                        extra=shared_state,
                    )
                )
                log = directory / "mailgate.log"
                logs.append(log)
                with log.open("wb") as out:
                    processes.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "mailgate", "serve", "--config", str(config)],
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            env=environment,
                            cwd=directory,
                        )
                    )
            for process, address, port, log in zip(
                processes, NODE_ADDRESSES, node_ports, logs, strict=True
            ):
                _wait_for_banner(address, port, process, log)
            haproxy_config = tmp_path / "haproxy.cfg"
            haproxy_config.write_text(_haproxy_config(proxy_port, node_ports))
            haproxy_log = tmp_path / "haproxy.log"
            with haproxy_log.open("wb") as out:
                processes.append(
                    subprocess.Popen(
                        [haproxy, "-db", "-f", str(haproxy_config)], stdout=out, stderr=out
                    )
                )
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection((HAPROXY_ADDRESS, proxy_port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError(haproxy_log.read_text()) from None
                    time.sleep(0.05)
            stats["start_s"] = round(time.monotonic() - started, 1)

            # Slow deliveries: the nodes hold leases while the receiver takes its time.
            receiver.delay = 1.0
            submit_started = time.monotonic()
            acknowledged, failures, source_of = asyncio.run(_submit(proxy_port, domain, run_id))
            stats["submit_s"] = round(time.monotonic() - submit_started, 1)
            assert not failures, failures[:5]
            assert len(acknowledged) == MESSAGES

            # The first client has sent its share; it tries LIMIT_ATTEMPTS more, one per
            # connection, so all three nodes see it.
            limited, refused = asyncio.run(
                _rate_limited(proxy_port, domain, run_id, CLIENT_ADDRESSES[0], LIMIT_ATTEMPTS)
            )
            own_share = MESSAGES // len(CLIENT_ADDRESSES)
            stats.update(rate_limited_accepted=len(limited), rate_limited_refused=len(refused))
            assert len(limited) == RATE_LIMIT - own_share, stats
            assert len(refused) == LIMIT_ATTEMPTS - len(limited)
            assert refused and all(400 <= code < 500 for code in refused), refused
            acknowledged |= limited
            for message_id in limited:
                source_of[message_id] = CLIENT_ADDRESSES[0]

            # Freeze the victim (no new claims, no results), count what it holds, kill it.
            victim = processes[1]
            in_flight = 0
            for _ in range(50):
                victim.send_signal(signal.SIGSTOP)
                in_flight = asyncio.run(_leases_of(postgres_dsn, schema, victim.pid))
                if in_flight:
                    break
                victim.send_signal(signal.SIGCONT)
                time.sleep(0.1)
            with receiver.lock:
                open_at_receiver = receiver.active["node1.mailgate.test"]
                delivered_before = sum(receiver.delivered.values())
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            killed_at = time.monotonic()
            assert in_flight > 0, "the victim held no lease to lose"
            stats.update(
                killed_node_leases=in_flight,
                killed_node_transactions_open_at_receiver=open_at_receiver,
                delivered_before_kill=delivered_before,
            )

            # The others take its messages over; the receiver speeds up to finish soon.
            receiver.delay = 0.05
            # HAProxy's health checks (SMTP EHLO after a PROXY header) take the dead node
            # out: new clients are all served by the two others.
            time.sleep(1.5)
            after_kill, refused_after = asyncio.run(
                _rate_limited(proxy_port, domain, run_id + "k", CLIENT_ADDRESSES[1], 30)
            )
            stats["accepted_after_kill"] = len(after_kill)
            assert len(after_kill) == 30 and not refused_after, stats
            acknowledged |= after_kill
            for message_id in after_kill:
                source_of[message_id] = CLIENT_ADDRESSES[1]
            deadline = time.monotonic() + 45
            while True:
                with receiver.lock:
                    missing = [m for m in acknowledged if m not in receiver.delivered]
                if not missing:
                    break
                if time.monotonic() > deadline:
                    pending = asyncio.run(_pending(postgres_dsn, schema))
                    raise AssertionError(
                        f"{len(missing)} acknowledged messages never arrived "
                        f"({pending} recipients pending in the queue)"
                    )
                time.sleep(0.2)
            stats["drained_after_kill_s"] = round(time.monotonic() - killed_at, 1)
            time.sleep(0.5)  # a late duplicate would arrive now
            assert asyncio.run(_pending(postgres_dsn, schema)) == 0
        finally:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)

    with receiver.lock:
        delivered = dict(receiver.delivered)
        by_node = dict(receiver.by_node)
    duplicates = sum(count - 1 for count in delivered.values() if count > 1)
    stats.update(
        acknowledged=len(acknowledged),
        delivered_unique=len(delivered),
        duplicates=duplicates,
        deliveries_by_node=by_node,
        total_s=round(time.monotonic() - started, 1),
    )
    print(f"\nmulti-node run: {json.dumps(stats)}")

    assert set(delivered) >= acknowledged
    assert set(delivered) <= acknowledged | {"?"} and "?" not in delivered
    assert duplicates <= in_flight, stats
    # Every node delivered; the victim before it died.
    assert all(by_node.get(f"node{n}.mailgate.test") for n in range(3)), by_node

    # The nodes logged each client's own address (from PROXY v2), never HAProxy's.
    clients: collections.Counter[str] = collections.Counter()
    for log in logs:
        for line in log.read_text().splitlines():
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            if " accepted from=<" in entry.get("msg", ""):
                clients[entry["client"]] += 1
    print(f"accepted lines by client address: {dict(clients)}")
    assert set(clients) == set(CLIENT_ADDRESSES)
    # The killed node's log may miss lines it had no time to write; the others' are there.
    assert sum(clients.values()) >= len(acknowledged) * 2 // 3
    expected = collections.Counter(source_of.values())
    assert all(clients[address] <= expected[address] for address in CLIENT_ADDRESSES)
