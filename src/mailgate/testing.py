"""A real mailgate server for your application's own tests.

Start a server on 127.0.0.1 with a free port, send it mail with any client, then look at
what it received::

    import smtplib
    from mailgate.testing import running_server

    def test_signup_mail_is_sent():
        with running_server() as srv:
            send_signup_mail(smtp_host=srv.host, smtp_port=srv.port)   # your code
            [msg] = srv.messages
            assert msg.rcpt_tos == ["new.user@example.com"]
            assert msg.as_email()["Subject"] == "Welcome"

``running_server`` runs the server on its own event loop in a background thread, for
synchronous tests; ``async_running_server`` runs it in the current event loop, for
asyncio tests. Both take the same settings as :class:`mailgate.Server` (and ``mailgate
serve``); register hooks in ``configure=`` (called with the :class:`~mailgate.Server`
before it starts). With pytest installed, the ``mailgate_server`` fixture gives such a
server per test (this module is registered as a pytest plugin by mailgate's package).

A message is captured when the server accepts it (the client got its ``250``), with the
bytes the server would deliver (a ``Received:`` header first, unless
``no_received_header=True``). Nothing is written outside a temporary directory that is
removed when the server stops.

This module imports no pytest and no server code until it is used, so loading it as a
pytest plugin costs next to nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.message
import email.policy
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailgate.composition.server import Server
    from mailgate.hooks import Address, Envelope, HookContext, Message, Session

__all__ = [
    "Captured",
    "CapturedMessage",
    "RunningServer",
    "async_running_server",
    "running_server",
]

#: Settings that suit tests; anything given to running_server() replaces them.
TEST_DEFAULTS: dict[str, Any] = {
    "listen": "127.0.0.1:0",
    "hostname": "localhost",
    "auth_failure_delay": 0,  # a test that tries a wrong password should not wait
    "close_timeout": 5,
}


@dataclass(frozen=True, eq=False)
class CapturedMessage:
    """One message the server accepted: its envelope and the bytes as delivered."""

    id: str
    #: The reverse-path; ``""`` for the null sender ``<>``.
    mail_from: Address
    #: The recipients the message was accepted for (in LMTP, those answered with a 2xx).
    rcpt_tos: list[Address]
    content: bytes
    envelope: Envelope
    #: The live session of the connection that sent it (peer, helo, user, tls, notes).
    session: Session

    @property
    def sender(self) -> str:
        return str(self.mail_from)

    def as_email(self) -> email.message.EmailMessage:
        """The message parsed with the stdlib ``email`` package (``policy=default``)."""
        msg = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg


class Captured(list[CapturedMessage]):
    """The messages a test server accepted, oldest first: a list you can index, plus
    ways to wait for messages sent from another thread or task."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = threading.Condition()

    def _add(self, message: CapturedMessage) -> None:
        with self._changed:
            self.append(message)
            self._changed.notify_all()

    def wait(self, count: int = 1, timeout: float = 5.0) -> list[CapturedMessage]:
        """Block until at least ``count`` messages arrived (for servers started with
        ``running_server``); raises TimeoutError after ``timeout`` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self) >= count, timeout):
                raise TimeoutError(f"{len(self)} message(s) captured, expected {count}")
            return list(self)

    async def wait_async(self, count: int = 1, timeout: float = 5.0) -> list[CapturedMessage]:
        """The same for asyncio tests: waits without blocking the event loop (which may
        be the one the server runs in)."""
        deadline = time.monotonic() + timeout
        while len(self) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(self)} message(s) captured, expected {count}")
            await asyncio.sleep(0.01)
        return list(self)


class _Capture:
    """Records each accepted message. A middleware, so it sees the final answer of the
    whole message chain (wherever other hooks are ordered); its no-op message step makes
    the server spool messages even with the default ``sink`` delivery."""

    name = "mailgate.testing"

    def __init__(self, captured: Captured, lmtp: Callable[[], bool]) -> None:
        self.captured = captured
        self.lmtp = lmtp
        self._seen: dict[str, bytes] = {}

    async def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
        # The bytes as deliveries get them: after the built-in policy steps, which run
        # first and may add headers (Authentication-Results, X-Mailgate-DNSBL...).
        if message.path is not None:
            loop = asyncio.get_running_loop()
            self._seen[message.id] = await loop.run_in_executor(None, message.read_bytes)

    async def middleware(self, ctx: HookContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
        if ctx.stage != "message":
            return await call_next()
        from mailgate.hooks import Address

        envelope, message = ctx.args
        # Read before the chain as well, for a chain that ends before our own step: a
        # delivery may move the spooled file away (Maildir links it into new/).
        content = b""
        if message.path is not None:
            content = await asyncio.get_running_loop().run_in_executor(None, message.read_bytes)
        try:
            result = await call_next()
        finally:
            content = self._seen.pop(message.id, content)
        recipients = _accepted_recipients(result, envelope.rcpt_tos, lmtp=self.lmtp())
        if recipients:
            self.captured._add(
                CapturedMessage(
                    id=message.id,
                    mail_from=envelope.mail_from or Address(""),
                    rcpt_tos=recipients,
                    content=content,
                    envelope=envelope,
                    session=ctx.session,
                )
            )
        return result


def _positive(answer: Any) -> bool:
    """Whether one chain answer means 'accepted' (None goes on to the default 250)."""
    from mailgate.hooks import Accept
    from mailgate.protocol import Reply

    if answer is None or answer is True or isinstance(answer, Accept):
        return True
    if isinstance(answer, Reply):
        return answer.code < 400
    return False  # False, Reject, TempFail


def _accepted_recipients(
    result: Any, rcpt_tos: tuple[Address, ...], *, lmtp: bool
) -> list[Address]:
    """The recipients the client is told the message was accepted for (the server's
    rules: one answer per recipient only in LMTP, and then one for each)."""
    from mailgate.hooks import PerRecipient

    if not isinstance(result, PerRecipient):
        return list(rcpt_tos) if _positive(result) else []
    if not lmtp:
        return []  # the server answers 451: SMTP has one reply per message
    answers = result.answers
    if isinstance(answers, dict):
        by_address = {str(k).lower(): v for k, v in answers.items()}
        return [r for r in rcpt_tos if _positive(by_address.get(str(r).lower()))]
    if len(answers) != len(rcpt_tos):
        return []  # the server answers 451 for all: a list must have one answer per recipient
    return [r for r, answer in zip(rcpt_tos, answers, strict=True) if _positive(answer)]


class RunningServer:
    """A :class:`mailgate.Server` for tests, with every accepted message in
    :attr:`messages`. Use it as ``with`` (a background thread with its own event loop)
    or ``async with`` (the current loop); register hooks on :attr:`server` before that,
    or pass ``configure=``.

    Settings are those of :class:`mailgate.Server`; by default it listens on
    127.0.0.1 port 0, delivers nowhere but :attr:`messages`, answers failed AUTH without
    delay and keeps its state (development certificate, spool) in a temporary directory.
    """

    def __init__(self, *, configure: Callable[[Server], object] | None = None, **settings: Any):
        from mailgate.composition.server import Server

        self._tmp: Path | None = None
        if settings.get("state_dir") is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="mailgate-test-"))
            settings["state_dir"] = self._tmp
        try:
            self.server = Server(**{**TEST_DEFAULTS, **settings})
        except BaseException:
            self._cleanup()
            raise
        self.messages = Captured()
        server = self.server
        capture = _Capture(self.messages, lambda: server.options.lmtp)
        # Added first, so the capture is the outermost middleware: it sees the answer
        # the client gets, after anything the test's own middleware does.
        self.server.use(capture.middleware)
        self.server.add_plugin(capture)
        if configure is not None:
            configure(self.server)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- where to connect ----------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` of the first listener: ``smtplib.SMTP(*srv.address)``."""
        return self.server.address

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    def client_tls_context(self) -> ssl.SSLContext:
        """An SSL context for clients that trusts this server's certificate (the
        development one unless ``tls_cert`` was given), for clients that verify it, such
        as aiosmtplib: ``aiosmtplib.send(..., tls_context=srv.client_tls_context())``."""
        from mailgate.server.tls import DEV_CERT_NAME

        options = self.server.options
        cert = options.tls_cert or options.state_dir / DEV_CERT_NAME
        context = ssl.create_default_context(cafile=str(cert))
        # The server's own certificate is the trust anchor, even when it is not a CA.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        return context

    # --- in a thread, for synchronous tests ------------------------------------------------

    def start(self, timeout: float = 30.0) -> RunningServer:
        """Start the server on a new event loop in a daemon thread; returns when it listens
        (or raises what made the start fail)."""
        if self._thread is not None:
            raise RuntimeError("this test server was already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.server.start())
            except BaseException as exc:  # handed to the thread that called start()
                failure.append(exc)
                ready.set()
                _close_loop(loop)
                return
            ready.set()
            loop.run_forever()
            _close_loop(loop)

        self._loop = loop
        self._thread = threading.Thread(target=main, name="mailgate-test-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"the test server did not start within {timeout:g} s")
        if failure:
            self._thread.join(timeout)
            self._cleanup()
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop the server (connections get a 421) and its thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            wait = self.server.options.close_timeout + 10
            try:
                asyncio.run_coroutine_threadsafe(self.server.stop(), loop).result(wait)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(wait)
        self._cleanup()

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- in the current event loop, for asyncio tests ------------------------------------------

    async def __aenter__(self) -> RunningServer:
        try:
            await self.server.start()
        except BaseException:
            self._cleanup()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.server.stop()
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()


@contextlib.contextmanager
def running_server(
    *, configure: Callable[[Server], object] | None = None, **settings: Any
) -> Iterator[RunningServer]:
    """A server in a background thread for the ``with`` block (synchronous tests)."""
    with RunningServer(configure=configure, **settings) as srv:
        yield srv


@contextlib.asynccontextmanager
async def async_running_server(
    *, configure: Callable[[Server], object] | None = None, **settings: Any
) -> AsyncIterator[RunningServer]:
    """A server in the running event loop for the ``async with`` block (asyncio tests)."""
    async with RunningServer(configure=configure, **settings) as srv:
        yield srv


# --- the pytest plugin (registered through the "pytest11" entry point) -------------------------

try:
    import pytest
except ImportError:  # pytest is not needed for the helpers above
    pass
else:

    @pytest.fixture
    def mailgate_settings() -> dict[str, Any]:
        """Settings for ``mailgate_server``; override this fixture (in a conftest.py, a
        module or a class) to change them. A ``configure`` entry registers hooks."""
        return {}

    @pytest.fixture
    def mailgate_server(mailgate_settings: dict[str, Any]) -> Iterator[RunningServer]:
        """A running mailgate server (in a background thread) whose accepted messages
        are in ``.messages``; stopped after the test."""
        with running_server(**mailgate_settings) as srv:
            yield srv
