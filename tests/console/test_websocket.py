"""Live updates over a WebSocket (/api/v1/ws): aiohttp's client against a server in
capture mode; mail sent with smtplib arrives as an event."""

from __future__ import annotations

import asyncio
import json
import smtplib
from pathlib import Path

import aiohttp
from tests.server.harness import running_server

from mailgate.server import ListenAddress

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: live\r\n\r\nbody\r\n"


def _send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)


def test_websocket_events_and_origin_check(tmp_path: Path) -> None:
    with running_server(
        tmp_path,
        delivery="capture",
        capture=tmp_path / "captured",
        admin_listen=ListenAddress("127.0.0.1", 0),
    ) as server:
        console = server.server.console  # type: ignore[union-attr]
        assert console is not None
        url = f"http://127.0.0.1:{console.address[1]}/api/v1/ws"

        async def main() -> None:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
                    first = json.loads(await ws.receive_str(timeout=5))
                    assert first == {"event": "connected", "versions": {"messages": 0}}
                    await asyncio.to_thread(_send, server.port())
                    event = json.loads(await ws.receive_str(timeout=10))
                    assert event["event"] == "messages" and event["version"] >= 1
                    await ws.send_str("ignored")
                # Another site's page may not listen in.
                async with http.get(
                    url,
                    headers={
                        "Origin": "http://evil.example",
                        "Connection": "Upgrade",
                        "Upgrade": "websocket",
                        "Sec-WebSocket-Version": "13",
                        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                    },
                ) as refused:
                    assert refused.status == 403

        asyncio.run(main())
