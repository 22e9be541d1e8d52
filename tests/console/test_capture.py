"""Capture mode (--capture DIR) and the messages API: mail sent with smtplib, then listed,
searched, shown, downloaded and deleted over HTTP."""

from __future__ import annotations

import email.policy
import smtplib
import socket
import time
from email.message import EmailMessage
from pathlib import Path

from tests.console.http import request
from tests.server.harness import running_server, strip_received, wait_for

from mailgate.delivery.capture import CapturedMessages, MessageQuery
from mailgate.hooks import Address, Envelope, Session
from mailgate.server import ListenAddress

LOOPBACK_ANY_PORT = ListenAddress("127.0.0.1", 0)
PDF = b"%PDF-1.4 not really\x00\x01\x02"
HOSTILE_HTML = (
    '<p onclick="alert(1)">hi</p><script>alert(2)</script>'
    '<img src="http://192.0.2.1/pixel.png" onerror="alert(3)"><a href="javascript:alert(4)">x</a>'
)


def _plain() -> bytes:
    return b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: Hello one\r\n\r\nfirst\r\n"


def _rich() -> bytes:
    message = EmailMessage()
    message["From"] = "Carol <carol@example.org>"
    message["To"] = "dave@example.net"
    message["Subject"] = "=?utf-8?q?Invoice_=E2=82=AC?="
    message.set_content("see the attachment")
    message.add_alternative(HOSTILE_HTML, subtype="html")
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename="../bill 1.pdf")
    return message.as_bytes(policy=email.policy.SMTP)


def test_capture_and_the_messages_api(tmp_path: Path) -> None:
    with running_server(
        tmp_path,
        delivery="capture",
        capture=tmp_path / "captured",
        admin_listen=LOOPBACK_ANY_PORT,
    ) as server:
        console = server.server.console  # type: ignore[union-attr]
        assert console is not None and console.sources.capture is not None
        port = console.address[1]
        with smtplib.SMTP("127.0.0.1", server.port()) as client:
            client.sendmail("alice@example.org", ["bob@example.net"], _plain())
            client.sendmail("carol@example.org", ["dave@example.net", "erin@example.net"], _rich())
        assert wait_for(lambda: request(port, "/api/v1/messages").json()["total"] == 2)

        listed = request(port, "/api/v1/messages").json()
        newest, oldest = listed["messages"]
        assert newest["sender"] == "carol@example.org"
        assert newest["recipients"] == ["dave@example.net", "erin@example.net"]
        assert newest["subject"] == "Invoice \u20ac"  # encoded word decoded
        assert oldest["subject"] == "Hello one" and oldest["client"] == "127.0.0.1"

        def ids(query: str) -> list[str]:
            return [m["id"] for m in request(port, f"/api/v1/messages?{query}").json()["messages"]]

        assert ids("sender=carol") == [newest["id"]]
        assert ids("recipient=bob%40example.net") == [oldest["id"]]
        assert ids("subject=INVOICE") == [newest["id"]]
        assert ids("q=alice") == [oldest["id"]]
        assert ids("q=nobody") == []
        assert ids("limit=1") == [newest["id"]]
        assert ids("limit=1&offset=1") == [oldest["id"]]
        assert ids(f"before={oldest['received'] + 1e-6}") == [oldest["id"]]
        assert ids("since=2999-01-01") == []
        assert request(port, "/api/v1/messages?since=someday").status == 400

        shown = request(port, f"/api/v1/messages/{newest['id']}").json()
        assert shown["message"]["id"] == newest["id"]
        assert shown["text"].strip() == "see the attachment"
        assert shown["html"].strip() == HOSTILE_HTML  # as sent: the UI must sandbox it
        assert ["Subject", "Invoice \u20ac"] in shown["headers"]
        (attached,) = shown["attachments"]
        assert attached == {
            "index": 0,
            "filename": "../bill 1.pdf",
            "content_type": "application/pdf",
            "size": len(PDF),
        }

        download = request(port, f"/api/v1/messages/{newest['id']}/attachments/0")
        assert download.body == PDF
        assert download.headers["content-type"] == "application/octet-stream"
        # Never shown inline, and the name cannot climb out of a download directory.
        assert download.headers["content-disposition"] == 'attachment; filename="..bill1.pdf"'
        assert request(port, f"/api/v1/messages/{newest['id']}/attachments/1").status == 404

        html = request(port, f"/api/v1/messages/{newest['id']}/html")
        assert html.text.strip() == HOSTILE_HTML
        policy = html.headers["content-security-policy"]
        assert policy.startswith("sandbox; default-src 'none';") and "img-src data:;" in policy
        assert "script-src" not in policy and html.headers["x-frame-options"] == "SAMEORIGIN"
        remote = request(port, f"/api/v1/messages/{newest['id']}/html?images=remote")
        assert "img-src data: http: https:;" in remote.headers["content-security-policy"]
        assert request(port, f"/api/v1/messages/{oldest['id']}/html").status == 404  # no HTML

        raw = request(port, f"/api/v1/messages/{oldest['id']}/raw")
        assert raw.headers["content-type"] == "text/plain; charset=utf-8"
        assert strip_received(raw.body) == _plain()

        assert request(port, "/api/v1/messages/NOSUCH").status == 404
        assert request(port, "/api/v1/messages/..%2Fx/raw").status == 404
        forged = request(
            port,
            f"/api/v1/messages/{oldest['id']}",
            method="DELETE",
            headers={"Origin": "http://evil.example"},
        )
        assert forged.status == 403
        deleted = request(port, f"/api/v1/messages/{oldest['id']}", method="DELETE")
        assert (deleted.status, deleted.json()) == (200, {"messages": 1})
        assert request(port, f"/api/v1/messages/{oldest['id']}", method="DELETE").status == 404
        assert ids("") == [newest["id"]]
        assert request(port, "/api/v1/messages", method="DELETE").json() == {"messages": 1}
        assert request(port, "/api/v1/messages").json()["total"] == 0
    assert list((tmp_path / "captured" / "messages").iterdir()) == []


def test_event_stream_tells_of_new_mail_and_ends_with_the_server(tmp_path: Path) -> None:
    with running_server(
        tmp_path, delivery="capture", capture=tmp_path / "captured", admin_listen=LOOPBACK_ANY_PORT
    ) as server:
        port = server.server.console.address[1]  # type: ignore[union-attr]
        stream = socket.create_connection(("127.0.0.1", port), timeout=10)
        stream.sendall(f"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        received = bytearray()

        def read_until(marker: bytes) -> None:
            while marker not in received:
                chunk = stream.recv(4096)
                assert chunk, bytes(received)
                received.extend(chunk)

        read_until(b": connected")
        assert b"text/event-stream" in received
        with smtplib.SMTP("127.0.0.1", server.port()) as client:
            client.sendmail("alice@example.org", ["bob@example.net"], _plain())
        read_until(b"event: messages\ndata: 1\n")
        began = time.monotonic()
    # The open stream did not hold the stop up; the server closed it.
    assert time.monotonic() - began < 5
    stream.settimeout(5)
    while stream.recv(4096):
        pass
    stream.close()


def _deliver(store: CapturedMessages, tmp_path: Path, message_id: str, size: int) -> None:
    source = tmp_path / f"{message_id}.spool"
    source.write_bytes(b"Subject: x\r\n\r\n" + b"y" * (size - 14))
    session = Session("S", "192.0.2.1", 1, "127.0.0.1", 25)
    envelope = Envelope(Address("a@example.org"), (Address("b@example.org"),))
    store.commit(store.stage(message_id, source), message_id, session, envelope)


def test_oldest_messages_go_first_over_the_cap(tmp_path: Path) -> None:
    store = CapturedMessages(tmp_path / "captured", max_bytes=2500)
    try:
        for number in range(3):
            _deliver(store, tmp_path, f"M{number}", 1000)
        # 3000 bytes > 2500: the oldest went.
        found, total = store.search(MessageQuery())
        assert total == 2 and [m.id for m in found] == ["M2", "M1"]
        assert not store.path_of("M0").exists() and store.path_of("M1").exists()
        assert store.stats() == (2, 2000)
    finally:
        store.close()


def test_an_aborted_delivery_leaves_nothing(tmp_path: Path) -> None:
    store = CapturedMessages(tmp_path / "captured")
    try:
        source = tmp_path / "spool"
        source.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
        staged = store.stage("M1", source)
        assert staged.exists()
        store.abort(staged)
        assert list(store.messages_dir.iterdir()) == []
        assert store.search(MessageQuery()) == ([], 0)
    finally:
        store.close()
