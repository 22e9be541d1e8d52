"""kill -9 of ``mailgate serve`` while it accepts and relays 1,000 messages; after a
restart (with two worker processes on the same queue) every message that got a 250 is
delivered at least once. Duplicates are counted and reported: only deliveries in flight
at the kill may be repeated."""

from __future__ import annotations

import asyncio
import itertools
import re
import smtplib
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from tests.dns_server import DNSTestServer
from tests.outbound.helpers import new_domain, publish_mx
from tests.outbound.receivers import Receiver, free_port
from tests.server.harness import CLIServer

from mailgate.queue import SQLiteQueueStore

pytestmark = pytest.mark.slow

TOTAL = 1000
CLIENTS = 4
KILL_AFTER = 400
SUBJECT = re.compile(rb"Subject: crash (\d+)\r\n")


def config(tmp_path: Path, dns: DNSTestServer, mx_port: int, port: int) -> Path:
    path = tmp_path / "mailgate.toml"
    path.write_text(
        f"""
[server]
hostname = "mx.crash.test"
listen = "127.0.0.1:{port}"
state_dir = "{tmp_path / "state"}"
sink = true
dns_nameservers = ["{dns.address}"]
max_clients_per_ip = 50
close_timeout = 2

[queue]
retry_schedule = ["1s"]
lifetime = "1h"

[outbound]
port = {mx_port}
connect_timeout = 2
command_timeout = 10
dead_after_failures = 1000

[[routes]]
recipients = ["*"]
action = "relay"
"""
    )
    return path


class Clients:
    """Four smtplib clients sending messages ``crash 0`` .. ``crash 999``; a message that
    fails (the server died under it) is not retried: it never got its 250."""

    def __init__(self, port: int, domain: str) -> None:
        self.port = port
        self.domain = domain
        self.numbers = itertools.count()
        self.lock = threading.Lock()
        self.accepted: set[int] = set()
        self.failed: set[int] = set()
        #: Why each of ``failed`` failed (for the report).
        self.why: list[str] = []
        self.deadline = time.monotonic() + 240

    def run(self) -> None:
        threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        self.threads = threads

    def join(self) -> None:
        for thread in self.threads:
            thread.join(max(1.0, self.deadline - time.monotonic()))

    def _next(self) -> int | None:
        with self.lock:
            number = next(self.numbers)
        return number if number < TOTAL else None

    def _client(self) -> None:
        number = self._next()
        while number is not None and time.monotonic() < self.deadline:
            try:
                smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=20)
            except OSError:
                time.sleep(0.1)  # the server is restarting: the same message again
                continue
            try:
                with smtp:
                    while number is not None:
                        self._send(smtp, number)
                        number = self._next()
            except (OSError, smtplib.SMTPException) as exc:
                # The server died under this transaction: it never got its 250.
                with self.lock:
                    self.failed.add(number)
                    self.why.append(f"{number}: {exc!r}")
                number = self._next()

    def _send(self, smtp: smtplib.SMTP, number: int) -> None:
        message = (
            f"From: a@example.org\r\nTo: b@{self.domain}\r\n"
            f"Subject: crash {number}\r\n\r\nbody {number}\r\n"
        )
        try:
            smtp.sendmail("a@example.org", [f"b{number % 7}@{self.domain}"], message)
        except smtplib.SMTPResponseException as exc:
            with self.lock:
                self.failed.add(number)
                self.why.append(f"{number}: {exc!r}")
        else:
            with self.lock:
                self.accepted.add(number)


def delivered(receiver: Receiver) -> Counter[int]:
    with receiver.lock:
        found = [SUBJECT.search(message.data) for message in receiver.messages]
    return Counter(int(match.group(1)) for match in found if match)


async def queue_size(directory: Path) -> int:
    store = await SQLiteQueueStore.open(directory)
    try:
        return len(await store.list_messages())
    finally:
        await store.aclose()


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port}")


def test_kill_9_while_accepting_and_relaying(
    tmp_path: Path, dns_server: DNSTestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    mx_port = free_port(range(21, 22))
    domain = new_domain("crash")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.21"))
    port = free_port(range(1, 2))
    path = config(tmp_path, dns_server, mx_port, port)
    with Receiver("127.0.0.21", mx_port) as receiver:
        first = CLIServer(["--config", str(path)], tmp_path).start()
        try:
            clients = Clients(port, domain)
            clients.run()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with clients.lock:
                    if len(clients.accepted) >= KILL_AFTER:
                        break
                time.sleep(0.01)
            first.kill()  # SIGKILL, mid-run: clients in a transaction, deliveries in flight
        finally:
            first.kill()
        with clients.lock:
            accepted_before = len(clients.accepted)
        at_kill = delivered(receiver)
        delivered_at_kill = sum(at_kill.values())
        second = CLIServer(["--config", str(path), "--workers", "2"], tmp_path)
        second.start(expected_listeners=2)
        try:
            wait_port(port)
            clients.join()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if asyncio.run(queue_size(tmp_path / "state" / "queue")) == 0:
                    break
                time.sleep(0.5)
            remaining = asyncio.run(queue_size(tmp_path / "state" / "queue"))
        finally:
            assert second.stop() == 0, second.text()
    # Which worker processes of the restarted server made delivery attempts.
    workers = {
        match.group(1)
        for line in second.log
        if (match := re.search(r"\[(\d+)\] mailgate\.queue\.outbound:", line))
    }
    counts = delivered(receiver)
    accepted = clients.accepted
    missing = sorted(accepted - set(counts))
    duplicates = {number: count for number, count in counts.items() if count > 1}
    with capsys.disabled():
        print(
            f"\ncrash test: {len(accepted)} accepted ({accepted_before} before the kill), "
            f"{len(clients.failed)} not accepted, {delivered_at_kill} delivered before the "
            f"kill, {sum(counts.values())} deliveries of {len(counts)} messages, "
            f"{len(duplicates)} delivered twice, {len(missing)} missing, {remaining} left queued; "
            f"{len(workers)} worker process(es) delivered after the restart"
        )
        print("not accepted:", "; ".join(clients.why))
    assert remaining == 0
    assert not missing, missing[:20]
    assert len(accepted) + len(clients.failed) == TOTAL
    assert accepted_before >= KILL_AFTER
    # A repeat is a delivery in flight at the kill: the receiver had the message before
    # the kill but the queue had not recorded it; tried again after the restart, once.
    assert set(duplicates) <= set(at_kill)
    assert all(count == 2 for count in duplicates.values())
    assert len(duplicates) <= 100  # at most max_deliveries were in flight
