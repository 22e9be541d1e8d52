"""Every program in examples/ is started as its own process and receives a real message.

Each example takes ``--listen HOST:PORT`` and runs until SIGTERM (``server.run()``), which
logs "listening on HOST port N". The test starts it on port 0, reads the port from that
line, drives it with a real client (a driver per example, below), checks what it printed,
then stops it with SIGTERM and expects exit status 0. A new example without a driver
fails here: add one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import BodyPartReader, web

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
LISTENING = re.compile(r"listening on (\S+) port (\d+)")
START_TIMEOUT = 15.0

BODY = "From: a@example.com\r\nTo: alice@example.com\r\nSubject: {subject}\r\n\r\n{text}\r\n"


class Example:
    """One example program running as a subprocess, its output collected line by line."""

    def __init__(self, path: Path, cwd: Path, extra_args: tuple[str, ...] = ()) -> None:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            # An embedded server keeps its state under $XDG_STATE_HOME: not the real home.
            "XDG_STATE_HOME": str(cwd / "state"),
        }
        self.path = path
        self.cwd = cwd
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self.proc = subprocess.Popen(
            [sys.executable, str(path), "--listen", "127.0.0.1:0", *extra_args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        match = self.wait_for(LISTENING, START_TIMEOUT)
        self.address = (match.group(1), int(match.group(2)))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = 5.0) -> re.Match[str]:
        """The first output line matching ``pattern``, waiting up to ``timeout`` seconds."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        found: list[re.Match[str]] = []

        def seen() -> bool:
            found[:] = [m for line in self.lines if (m := regex.search(line))][:1]
            return bool(found) or self._ended

        with self._changed:
            self._changed.wait_for(seen, timeout)
        if not found:
            raise AssertionError(f"{self.path.name} never printed {regex.pattern!r}:\n{self}")
        return found[0]

    def stop(self) -> int:
        """SIGTERM, as a service manager would; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(10)
        finally:
            self.kill()
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __str__(self) -> str:
        return "\n".join(self.lines)


#: How a driver starts its example: with extra command-line arguments, if any.
Start = Callable[..., Example]


# --- drivers: one per example, each sends real mail and checks what the example did ---------


def drive_receive_to_app(start: Start) -> Example:
    ex = start()
    with smtplib.SMTP(*ex.address) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("a@example.com", ["x@elsewhere.test"], "Subject: no\r\n\r\nno\r\n")
        assert refused.value.recipients["x@elsewhere.test"][:1] == (550,)
        body = BODY.format(subject="Invoice 42", text="Please pay.")
        client.sendmail("a@example.com", ["alice@example.com"], body)
    ex.wait_for(r"from <a@example.com> to alice@example.com: subject 'Invoice 42'")
    return ex


def drive_plugin_chain(start: Start) -> Example:
    ex = start()
    assert ex.wait_for(r"^chain: ").group(0)
    assert "chain: mailboxes -> spam-words -> printer" in str(ex)
    with smtplib.SMTP(*ex.address) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("a@example.com", ["nobody@example.com"], "Subject: x\r\n\r\nx\r\n")
        with pytest.raises(smtplib.SMTPDataError) as spam:
            spam_body = BODY.format(subject="Win", text="You won the LOTTERY")
            client.sendmail("a@example.com", ["alice@example.com"], spam_body)
        assert spam.value.smtp_code == 554
        body = BODY.format(subject="Lunch", text="Noon?")
        client.sendmail("a@example.com", ["alice@example.com", "bob@example.com"], body)
    ex.wait_for(r"accepted \S+ for alice@example.com, bob@example.com \(clean\)")
    ex.wait_for(r"timing: message took [\d.]+ ms")
    ex.wait_for(r"timing: rcpt took [\d.]+ ms")
    return ex


def drive_auth_callback(start: Start) -> Example:
    ex = start()
    with smtplib.SMTP(*ex.address) as client:
        client.ehlo()
        assert not client.has_extn("auth"), "AUTH must wait for TLS"
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("alice@example.com", ["bob@example.com"], "Subject: x\r\n\r\nx\r\n")
        assert refused.value.smtp_code == 530
        client.starttls()  # the development certificate (smtplib does not verify it)
        client.ehlo()
        assert "CRAM-MD5" in client.esmtp_features["auth"]
        client.login("alice", "wonderland")  # smtplib picks CRAM-MD5: verify() checks it
        body = BODY.format(subject="Signed in", text="hello")
        client.sendmail("alice@example.com", ["bob@example.com"], body)
    ex.wait_for(r"alice \(AUTH CRAM-MD5\) sent \S+ to bob@example.com over TLSv1\.[23]")
    return ex


def drive_lmtp_per_recipient(start: Start) -> Example:
    ex = start()
    body = BODY.format(subject="Big", text="x" * 2000)
    replies = lmtp_send(ex.address, ["alice@example.com", "tiny@example.com"], body)
    assert [r[:9] for r in replies] == ["250 2.1.5", "452 4.2.2"], replies
    ex.wait_for(r"delivered \S+ to alice@example.com")
    stored = list((ex.cwd / "mailboxes" / "alice@example.com" / "new").iterdir())
    assert len(stored) == 1 and b"Subject: Big" in stored[0].read_bytes()
    assert "to tiny@example.com" not in str(ex)
    return ex


def lmtp_send(address: tuple[str, int], rcpts: list[str], body: str) -> list[str]:
    """One LMTP transaction over a raw socket (smtplib.LMTP reads only one reply after
    DATA); the replies to the end of data, one per recipient."""
    with socket.create_connection(address, timeout=5) as sock:
        reader = sock.makefile("rb")

        def reply() -> str:
            while True:
                line = reader.readline().decode()
                assert line, "connection closed"
                if line[3:4] != "-":
                    return line.strip()

        assert reply().startswith("220")
        commands = ["LHLO client.test", "MAIL FROM:<a@example.com>"]
        commands += [f"RCPT TO:<{r}>" for r in rcpts] + ["DATA"]
        for command in commands:
            sock.sendall(command.encode() + b"\r\n")
            answer = reply()
            assert answer[0] in "23", (command, answer)
        sock.sendall(body.encode() + b".\r\n")
        replies = [reply() for _ in rcpts]
        sock.sendall(b"QUIT\r\n")
        return replies


def drive_aiosmtpd_handler(start: Start) -> Example:
    ex = start()
    with smtplib.SMTP(*ex.address) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("a@example.com", ["x@elsewhere.test"], "Subject: no\r\n\r\nno\r\n")
        assert refused.value.recipients["x@elsewhere.test"] == (
            550,
            b"5.1.2 not relaying to that domain",
        )
        body = BODY.format(subject="From a handler", text="hi")
        client.sendmail("a@example.com", ["alice@example.com"], body)
    ex.wait_for(
        r"aiosmtpd handler: message from a@example.com \(peer 127.0.0.1\) "
        r"to alice@example.com: subject 'From a handler'"
    )
    return ex


def drive_webhook_relay(start: Start) -> Example:
    with WebhookEndpoint() as endpoint:
        ex = start("--webhook", endpoint.url)
        with smtplib.SMTP(*ex.address) as client:
            body = BODY.format(subject="Ticket", text="My printer is on fire")
            client.sendmail("a@example.org", ["support@example.com"], body)
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("a@example.org", ["closed@example.com"], body)
        assert refused.value.smtp_code == 554
        # smtplib gives the reply text as bytes (typeshed says str)
        assert cast(bytes, refused.value.smtp_error).endswith(b": this list is closed")
        ex.wait_for(rf"relayed \S+ for support@example.com to {re.escape(endpoint.url)}")
        assert "for closed@example.com" not in str(ex)
        first = endpoint.requests[0]
        assert first["api_key"] == "dev-key"
        assert first["envelope"]["mail_from"] == "a@example.org"
        assert first["envelope"]["rcpt_tos"][0]["address"] == "support@example.com"
        assert b"Subject: Ticket" in first["message"]
    return ex


class WebhookEndpoint:
    """An HTTP endpoint on 127.0.0.1 in a thread: stores each POST, refuses mail for
    closed@ with 422 and a text the example passes on."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        parts: dict[str, Any] = {"api_key": request.headers.get("X-Api-Key")}
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            assert isinstance(part, BodyPartReader)
            data = await part.read()
            parts[part.name or ""] = json.loads(data) if part.name == "envelope" else data
        self.requests.append(parts)
        if parts["envelope"]["rcpt_tos"][0]["address"].startswith("closed@"):
            return web.Response(status=422, text="this list is closed")
        return web.Response(status=204)

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_post("/inbound-mail", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/inbound-mail"

    def __enter__(self) -> WebhookEndpoint:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


DRIVERS: dict[str, Callable[[Start], Example]] = {
    "receive_to_app.py": drive_receive_to_app,
    "plugin_chain.py": drive_plugin_chain,
    "auth_callback.py": drive_auth_callback,
    "lmtp_per_recipient.py": drive_lmtp_per_recipient,
    "aiosmtpd_handler.py": drive_aiosmtpd_handler,
    "webhook_relay.py": drive_webhook_relay,
}


def test_every_example_has_a_driver() -> None:
    names = {path.name for path in EXAMPLES}
    assert names, f"no examples found in {EXAMPLES_DIR}"
    assert names - DRIVERS.keys() == set(), "examples without a driver in this file"
    assert DRIVERS.keys() - names == set(), "drivers for examples that do not exist"


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example(path: Path, tmp_path: Path) -> None:
    driver = DRIVERS.get(path.name)
    assert driver is not None, f"{path.name} has no driver in {__file__}; add one"
    started: list[Example] = []

    def start(*extra_args: str) -> Example:
        assert not started, "a driver starts its example once"
        started.append(Example(path, tmp_path, extra_args))
        return started[0]

    try:
        example = driver(start)
        code = example.stop()
    finally:
        for example in started:
            example.kill()
            print(f"--- output of {path.name} ---\n{example}")  # shown when the test fails
    assert code == 0, f"{path.name} exited with {code}:\n{example}"
    assert "Traceback" not in str(example), str(example)
