"""Releasing a captured message through the queue, and the queue's delivery metrics: a
server in capture mode with ``[[routes]]`` (mail to the test's own domain is captured,
the rest goes onward), its console, the test DNS server publishing MX records, and real
receiving SMTP servers on 127.0.0.x. Nothing mocked."""

from __future__ import annotations

import asyncio
import json
import smtplib
from pathlib import Path
from typing import Any

import pytest
from tests.console.http import Response, request
from tests.dns_server import DNSTestServer
from tests.outbound.helpers import run
from tests.outbound.receivers import Receiver, free_port
from tests.queue.e2e import (
    new_domain,
    publish_mx,
    serving,
    settings,
    wait_for,
    wait_until_empty,
)

from mailgate import Server
from mailgate.server import ListenAddress


@pytest.fixture(scope="module")
def mx_port() -> int:
    """The port the test MX servers listen on, each on its own 127.0.0.x."""
    return free_port()


CAPTURED_DOMAIN = "dev.test"
ROUTES = [
    {"recipients": [f"*@{CAPTURED_DOMAIN}"], "action": "deliver"},
    {"recipients": ["*"], "action": "relay"},
]
MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: tester@dev.test\r\n"
    b"Subject: release me\r\n"
    b"Message-ID: <release-me@example.org>\r\n"
    b"\r\n"
    b"the body\r\n"
)


def _server_settings(tmp_path: Path, dns: DNSTestServer, mx_port: int) -> dict[str, Any]:
    values = settings(
        tmp_path,
        dns,
        mx_port,
        ROUTES,
        capture=tmp_path / "captured",
        admin_listen="127.0.0.1:0",
    )
    del values["maildir"]  # capture mode is the local delivery here
    return values


async def _http(port: int, path: str, **options: Any) -> Response:
    return await asyncio.to_thread(request, port, path, **options)


async def _release(port: int, message_id: str, body: dict[str, Any]) -> Response:
    return await _http(
        port,
        f"/api/v1/messages/{message_id}/release",
        method="POST",
        headers={"Content-Type": "application/json"},
        body=json.dumps(body).encode(),
    )


def _send(port: int, sender: str, recipients: list[str], data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail(sender, recipients, data)


def _console_port(server: Server) -> int:
    assert server.console is not None
    return server.console.address[1]


def _metric(text: str, name: str, labels: str = "") -> float:
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == wanted:
            return float(value)
    raise AssertionError(f"no {wanted} in the metrics")


def test_release_a_captured_message_to_an_address(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("release")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.11"))

    async def main() -> None:
        with Receiver("127.0.0.11", mx_port) as receiver:
            async with serving(**_server_settings(tmp_path, dns_server, mx_port)) as server:
                port, smtp_port = _console_port(server), server.addresses[0][1]
                await asyncio.to_thread(
                    _send, smtp_port, "alice@example.org", [f"tester@{CAPTURED_DOMAIN}"], MESSAGE
                )
                listed = await _http(port, "/api/v1/messages")
                [captured] = listed.json()["messages"]
                raw = (await _http(port, f"/api/v1/messages/{captured['id']}/raw")).body
                # Nothing went onward at capture time.
                assert receiver.messages == []

                released = await _release(port, captured["id"], {"to": [f"bob@{domain}"]})
                assert released.status == 202, released.text
                answer = released.json()
                assert answer["recipients"] == [f"bob@{domain}"]
                assert answer["sender"] == "alice@example.org"
                await wait_for(lambda: len(receiver.messages) == 1, what="the released message")

                # Another sender, and one address given as text with brackets.
                again = await _release(
                    port, captured["id"], {"to": f"<carol@{domain}>", "from": "ops@example.org"}
                )
                assert again.status == 202, again.text
                await wait_for(lambda: len(receiver.messages) == 2, what="the second release")

                # Addresses the rules do not send onward, bad input, unknown messages.
                local = await _release(port, captured["id"], {"to": [f"x@{CAPTURED_DOMAIN}"]})
                assert local.status == 422
                assert f"x@{CAPTURED_DOMAIN}" in local.json()["error"]
                assert "local delivery" in local.json()["error"]
                bad = await _release(port, captured["id"], {"to": ["not an address"]})
                assert bad.status == 400 and "not an address" in bad.json()["error"]
                assert (await _release(port, captured["id"], {})).status == 400
                assert (
                    await _release(port, "nosuchmessage", {"to": [f"b@{domain}"]})
                ).status == 404
                # A page of another site may not release anything.
                cross = await _http(
                    port,
                    f"/api/v1/messages/{captured['id']}/release",
                    method="POST",
                    headers={"Origin": "http://evil.example", "Content-Type": "application/json"},
                    body=json.dumps({"to": [f"bob@{domain}"]}).encode(),
                )
                assert cross.status == 403
                # Still the captured message, untouched.
                assert (await _http(port, f"/api/v1/messages/{captured['id']}/raw")).body == raw
        first, second = receiver.messages
        assert first.mail_from == "alice@example.org" and first.rcpt_tos == [f"bob@{domain}"]
        assert first.data == raw
        assert second.mail_from == "ops@example.org" and second.rcpt_tos == [f"carol@{domain}"]
        assert len(receiver.messages) == 2  # the refused releases sent nothing

    run(main())


def test_release_needs_a_queue(tmp_path: Path) -> None:
    from tests.server.harness import running_server

    with running_server(
        tmp_path,
        delivery="capture",
        capture=tmp_path / "captured",
        admin_listen=ListenAddress("127.0.0.1", 0),
    ) as server:
        console = server.server.console  # type: ignore[union-attr]
        assert console is not None
        port = console.address[1]
        _send(server.port(), "alice@example.org", ["bob@example.net"], MESSAGE)
        [captured] = request(port, "/api/v1/messages").json()["messages"]
        answer = request(
            port,
            f"/api/v1/messages/{captured['id']}/release",
            method="POST",
            body=b'{"to": ["bob@example.net"]}',
        )
        assert answer.status == 409
        assert "[[routes]]" in answer.json()["error"]


def test_delivery_attempts_by_result_in_the_metrics(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    """A known load: three recipients at one MX, one accepted, one deferred once (451,
    then accepted at the retry a second later), one refused (550), whose failure DSN goes
    back to the sender at the same MX. The counters are per process: the test reads them
    before and after."""
    domain = new_domain("attempts")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.12"))
    gone = {f"gone@{domain}": "550 5.1.1 no such user"}

    async def main() -> tuple[str, str]:
        with Receiver("127.0.0.12", mx_port) as receiver:
            receiver.cue.rcpt = {f"later@{domain}": "451 4.2.0 try again later", **gone}
            async with serving(**_server_settings(tmp_path, dns_server, mx_port)) as server:
                port = _console_port(server)
                before = (await _http(port, "/metrics")).text
                await asyncio.to_thread(
                    _send,
                    server.addresses[0][1],
                    f"alice@{domain}",
                    [f"ok@{domain}", f"later@{domain}", f"gone@{domain}"],
                    MESSAGE,
                )
                await wait_for(lambda: len(receiver.messages) >= 1, what="the delivery")
                receiver.cue.rcpt = dict(gone)  # the retry (a second later) is accepted
                # ok; later at its retry; the DSN about gone@ to alice@.
                await wait_for(lambda: len(receiver.messages) == 3, what="retry and DSN")
                await wait_until_empty(server)  # every result recorded
                after = (await _http(port, "/metrics")).text
        return before, after

    before, after = run(main())

    def grew(result: str) -> float:
        name = "mailgate_queue_delivery_attempts_total"
        labels = f'result="{result}"'
        return _metric(after, name, labels) - _metric(before, name, labels)

    assert (grew("delivered"), grew("deferred"), grew("failed")) == (3, 1, 1)
    name = "mailgate_queue_delivery_duration_seconds_count"
    assert _metric(after, name) - _metric(before, name) == 3  # three sessions with the MX
