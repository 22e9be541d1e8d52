"""WebhookDelivery against a real aiohttp.web endpoint on 127.0.0.1, fed by a real server."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiohttp import BodyPartReader, web
from tests.server.harness import make_certs, strip_received

from mailgate import Server
from mailgate.delivery.webhook import WebhookDelivery

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: to the app\r\n"
    b"\r\n"
    b"hello \xc3\xa9\r\n"
    b".dot line\r\n"
)

Answer = Callable[[int], Awaitable[web.StreamResponse]]


@dataclass
class Received:
    envelope: dict[str, Any]
    envelope_type: str
    message: bytes
    message_headers: dict[str, str]
    headers: dict[str, str]


@dataclass
class Endpoint:
    """An aiohttp.web app that records every POST and answers with ``answer(attempt)``."""

    answer: Answer
    attempts: int = 0
    answered: int = 0
    received: list[Received] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.attempts += 1
        attempt = self.attempts
        parts: dict[str, tuple[dict[str, str], bytes]] = {}
        reader = await request.multipart()
        async for part in reader:
            assert isinstance(part, BodyPartReader) and part.name is not None
            parts[part.name] = (dict(part.headers), bytes(await part.read(decode=False)))
        envelope_headers, envelope = parts["envelope"]
        message_headers, message = parts["message"]
        self.received.append(
            Received(
                json.loads(envelope),
                envelope_headers["Content-Type"],
                message,
                message_headers,
                dict(request.headers),
            )
        )
        response = await self.answer(attempt)
        self.answered += 1
        return response


async def ok(attempt: int) -> web.StreamResponse:
    return web.Response(status=204)


@asynccontextmanager
async def endpoint(
    answer: Answer = ok, port: int = 0, tls: ssl.SSLContext | None = None
) -> AsyncIterator[Endpoint]:
    ep = Endpoint(answer)
    app = web.Application()
    app.router.add_post("/mail", ep.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls)
    await site.start()
    host, port = runner.addresses[0][:2]
    ep.url = f"{'https' if tls else 'http'}://{host}:{port}/mail"
    try:
        yield ep
    finally:
        await runner.cleanup()


@asynccontextmanager
async def front(
    tmp_path: Path, plugin: WebhookDelivery | None = None, **extra: Any
) -> AsyncIterator[Server]:
    server = Server(
        hostname="front.test", listen="127.0.0.1:0", state_dir=tmp_path / "state", **extra
    )
    if plugin is not None:
        server.add_plugin(plugin)
    try:
        async with server:
            yield server
    finally:
        # The server does not close its plugins' HTTP sessions (yet); we do.
        for each in server.hooks.plugins():
            if isinstance(each, WebhookDelivery):
                await each.aclose()


async def send(
    port: int, rcpt_options: list[str] | None = None, data: bytes = MESSAGE
) -> tuple[int, str]:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as client:
        try:
            _, text = await client.sendmail(
                "alice@example.org",
                ["bob@example.com", "carol@example.com"],
                data,
                mail_options=["BODY=8BITMIME"],
                rcpt_options=rcpt_options,
            )
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
        return 250, text


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def plain(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=text, headers=headers)


# --- what the endpoint receives -------------------------------------------------------------


def test_endpoint_gets_the_raw_message_and_the_envelope(tmp_path: Path) -> None:
    async def main() -> None:
        async with endpoint() as ep, front(tmp_path, webhook=[ep.url]) as server:
            code, text = await send(server.address[1], rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
            assert code == 250, text
        [got] = ep.received
        assert strip_received(got.message) == MESSAGE  # byte for byte, after our trace header
        assert got.message.startswith(b"Received: from ")
        assert got.message_headers["Content-Type"] == "message/rfc822"
        assert f'filename="{got.envelope["id"]}.eml"' in got.message_headers["Content-Disposition"]
        assert got.envelope_type.startswith("application/json")
        assert got.headers["Idempotency-Key"] == got.envelope["id"]
        assert got.headers["Content-Type"].startswith("multipart/form-data; boundary=")
        envelope = got.envelope
        assert envelope["mail_from"] == "alice@example.org"
        assert envelope["mail_params"]["BODY"] == "8BITMIME"
        assert envelope["mail_params"]["SIZE"].isdigit()  # aiosmtplib declares SIZE
        assert envelope["rcpt_tos"] == [
            {"address": "bob@example.com", "params": {"NOTIFY": "SUCCESS,FAILURE"}},
            {"address": "carol@example.com", "params": {"NOTIFY": "SUCCESS,FAILURE"}},
        ]
        assert envelope["size"] == len(MESSAGE)
        assert datetime.fromisoformat(envelope["received_at"]).tzinfo is not None
        session = envelope["session"]
        assert session["peer"]["host"] == "127.0.0.1"
        assert isinstance(session["peer"]["port"], int)
        assert session["tls"] is None and session["user"] is None
        assert session["helo"]
        assert set(envelope) == {
            "id",
            "mail_from",
            "mail_params",
            "rcpt_tos",
            "size",
            "received_at",
            "session",
        }

    asyncio.run(main())


def test_null_sender_credentials_and_extra_headers(tmp_path: Path) -> None:
    async def main() -> None:
        async with endpoint() as ep:
            url = ep.url.replace("http://", "http://app:p%40ss@")
            plugin = WebhookDelivery(url, headers={"X-Api-Key": "k1"})
            assert plugin.name == f"webhook:{ep.url}"  # no user, no password
            async with front(tmp_path, plugin) as server:
                async with aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=server.address[1], start_tls=False
                ) as client:
                    await client.sendmail("", ["bob@example.com"], MESSAGE)
        [got] = ep.received
        assert got.envelope["mail_from"] == ""
        expected = base64.b64encode(b"app:p@ss").decode()
        assert got.headers["Authorization"] == f"Basic {expected}"
        assert got.headers["X-Api-Key"] == "k1"
        assert got.headers["User-Agent"] == "mailgate-webhook"

    asyncio.run(main())


def test_https_endpoint_verified_with_the_given_context(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(certs.cert, certs.key)
    client_tls = ssl.create_default_context(cafile=str(certs.ca_file))

    async def main() -> tuple[tuple[int, str], tuple[int, str], int]:
        async with endpoint(tls=server_tls) as ep:
            trusting = WebhookDelivery(ep.url, ssl_context=client_tls)
            async with front(tmp_path, trusting) as server:
                delivered = await send(server.address[1])
            doubting = WebhookDelivery(ep.url, retries=0)  # system CAs do not know ours
            async with front(tmp_path, doubting) as server:
                refused = await send(server.address[1])
            return delivered, refused, len(ep.received)

    delivered, refused, received = asyncio.run(main())
    assert delivered[0] == 250, delivered
    assert refused == (
        451,
        "4.7.5 Webhook endpoint unavailable: TLS handshake failed, try again later",
    )
    assert received == 1


# --- retries and failures --------------------------------------------------------------------


def test_two_500s_then_200_is_delivered_after_retries(tmp_path: Path) -> None:
    async def flaky(attempt: int) -> web.StreamResponse:
        return web.Response(status=500 if attempt <= 2 else 200)

    async def main() -> None:
        async with endpoint(flaky) as ep:
            plugin = WebhookDelivery(ep.url, retries=3, backoff=0.01)
            async with front(tmp_path, plugin) as server:
                code, text = await send(server.address[1])
        assert code == 250, text
        assert ep.attempts == 3
        assert [strip_received(r.message) for r in ep.received] == [MESSAGE] * 3
        assert len({r.envelope["id"] for r in ep.received}) == 1  # the same message each time

    asyncio.run(main())


def test_endpoint_down_gives_451_quickly(tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        plugin = WebhookDelivery(f"http://127.0.0.1:{closed_port()}/mail", backoff=0.01)
        async with front(tmp_path, plugin) as server:
            started = loop.time()
            code, text = await send(server.address[1])
            elapsed = loop.time() - started
        assert code == 451
        assert text.startswith("4.4.1 Webhook endpoint unavailable: cannot connect")
        assert elapsed < 2

    asyncio.run(main())


def test_slow_endpoint_times_out_with_451(tmp_path: Path) -> None:
    async def slow(attempt: int) -> web.StreamResponse:
        await asyncio.sleep(0.5)
        return web.Response(status=200)

    async def main() -> None:
        async with endpoint(slow) as ep:
            plugin = WebhookDelivery(ep.url, timeout=0.2, retries=1, backoff=0.01)
            async with front(tmp_path, plugin) as server:
                code, text = await send(server.address[1])
        assert (code, text) == (
            451,
            "4.4.1 Webhook endpoint unavailable: no answer in time, try again later",
        )
        assert ep.attempts == 2

    asyncio.run(main())


def test_busy_endpoint_is_retried_then_451(tmp_path: Path) -> None:
    async def busy(attempt: int) -> web.StreamResponse:
        return plain(429, "slow down please", **{"Retry-After": "0"})

    async def main() -> None:
        async with endpoint(busy) as ep:
            plugin = WebhookDelivery(ep.url, retries=2, backoff=0.01)
            async with front(tmp_path, plugin) as server:
                code, text = await send(server.address[1])
        assert (code, text) == (
            451,
            "4.3.2 Webhook endpoint unavailable: slow down please, try again later",
        )
        assert ep.attempts == 3

    asyncio.run(main())


@pytest.mark.parametrize(
    ("status", "body", "reply"),
    [
        (
            422,
            "unknown mailbox\nsecond line",
            (554, "5.7.1 Webhook endpoint refused the message: unknown mailbox"),
        ),
        (400, "", (554, "5.7.1 Webhook endpoint refused the message: HTTP 400 Bad Request")),
        (
            413,
            "",
            (
                552,
                "5.3.4 Message too big for the webhook endpoint: HTTP 413 Request Entity Too Large",
            ),
        ),
        (
            404,
            "",
            (451, "4.3.0 Webhook endpoint misconfigured: HTTP 404 Not Found, try again later"),
        ),
        (302, "", (451, "4.3.0 Webhook endpoint misconfigured: HTTP 302 Found, try again later")),
    ],
)
def test_refusals_are_not_retried(
    tmp_path: Path, status: int, body: str, reply: tuple[int, str]
) -> None:
    async def answer(attempt: int) -> web.StreamResponse:
        if body:
            return plain(status, body)
        return web.Response(status=status, headers={"Location": "/elsewhere"})

    async def main() -> None:
        async with endpoint(answer) as ep:
            plugin = WebhookDelivery(ep.url, backoff=0.01)
            async with front(tmp_path, plugin) as server:
                assert await send(server.address[1]) == reply
        assert ep.attempts == 1

    asyncio.run(main())


# --- background delivery, loops, construction ---------------------------------------------------


def test_not_required_webhook_does_not_hold_the_250(tmp_path: Path) -> None:
    async def slow(attempt: int) -> web.StreamResponse:
        await asyncio.sleep(1)
        return web.Response(status=200)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with endpoint(slow) as ep:
            plugin = WebhookDelivery(ep.url)
            plugin.required = False
            async with front(tmp_path, plugin) as server:
                started = loop.time()
                code, text = await send(server.address[1])
                replied = loop.time() - started
                assert code == 250, text
                assert replied < 0.5
                assert ep.answered == 0  # the endpoint is still busy with it
                for _ in range(100):  # bounded: 5 s
                    if ep.answered:
                        break
                    await asyncio.sleep(0.05)
                assert ep.answered == 1
        [got] = ep.received
        assert strip_received(got.message) == MESSAGE

    asyncio.run(main())


# The first loop closes with the plugin's session open (no aclose): its kept-alive socket
# can only be dropped, and Python says so when it collects it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_one_plugin_across_event_loops(tmp_path: Path) -> None:
    port = closed_port()
    plugin = WebhookDelivery(f"http://127.0.0.1:{port}/mail")

    async def deliver(closing: bool) -> int:
        async with endpoint(port=port) as ep:
            server = Server(hostname="f.test", listen="127.0.0.1:0", state_dir=tmp_path / "s")
            server.add_plugin(plugin)
            async with server:
                code, text = await send(server.address[1])
                assert code == 250, text
            if closing:
                await plugin.aclose()
            return len(ep.received)

    assert asyncio.run(deliver(closing=False)) == 1  # leaves a session on a closed loop
    assert asyncio.run(deliver(closing=True)) == 1


def test_url_checks_and_defaults() -> None:
    plugin = WebhookDelivery("https://user:secret@app.example.com/hooks/mail?x=1")
    assert plugin.name == "webhook:https://app.example.com/hooks/mail?x=1"
    assert "secret" not in repr(plugin)
    assert (plugin.timeout, plugin.retries, plugin.backoff, plugin.required) == (30.0, 3, 0.5, True)
    for url in ("ftp://app.example.com/", "http:///nohost", "not a url"):
        with pytest.raises(ValueError, match="webhook URL"):
            WebhookDelivery(url)
    with pytest.raises(ValueError, match=r"ftp://u:\*\*\*@app") as info:
        WebhookDelivery("ftp://u:secret@app.example.com/")
    assert "secret" not in str(info.value)
    with pytest.raises(ValueError, match="retries"):
        WebhookDelivery("http://app.example.com/", retries=-1)
    with pytest.raises(ValueError, match="webhook"):
        Server(listen="127.0.0.1:0", webhook=["ftp://app.example.com/"])
