"""SIGHUP rebuilds the policy chain from the new settings, whole or not at all.

In process, the reload goes the way ``mailgate serve`` does it on SIGHUP: the file is read
again with the same arguments (:func:`mailgate.config.build_options`) and handed to
``Server.reload``. The last test sends a real SIGHUP to a ``mailgate serve`` process.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import smtplib
from pathlib import Path

import pytest

from mailgate import Server
from mailgate.cli import build_parser
from mailgate.config import build_options
from mailgate.hooks import Address, Envelope, Session
from mailgate.server.options import ServerOptions

from .harness import CLIServer, wait_for
from .test_process import free_port

BEFORE = """\
[server]
listen = "127.0.0.1:0"
hostname = "mx.test"
sink = true
state_dir = "state"
local_domains = ["one.test"]
relay_networks = []

[limits]
messages_per_ip = "100/1h"
"""

AFTER = """\
[server]
listen = "127.0.0.1:0"
hostname = "mx.test"
sink = true
state_dir = "state"
local_domains = ["two.test"]
relay_networks = []

[limits]
messages_per_ip = "2/1h"

[lists]
block_senders = ["spam.test"]
"""

BROKEN = AFTER.replace('"2/1h"', '"often"')


def load(config: Path) -> ServerOptions:
    """What ``mailgate serve --config FILE`` reads, at start and on each SIGHUP."""
    return build_options(build_parser().parse_args(["serve", "--config", str(config)]))


def rcpt(port: int, sender: str, recipient: str) -> int:
    """The reply code to RCPT TO (or to MAIL FROM when that is refused), new connection."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        code, _ = smtp.mail(sender)
        if code != 250:
            return code
        code, _ = smtp.rcpt(recipient)
        return code


def send(port: int, recipient: str) -> int:
    """The reply to one whole message from a@sender.test (the first refusal's code)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        try:
            smtp.sendmail("a@sender.test", [recipient], b"Subject: x\r\n\r\nx\r\n")
        except smtplib.SMTPRecipientsRefused as exc:
            return exc.recipients[recipient][0]
        except smtplib.SMTPResponseException as exc:
            return exc.smtp_code
        return 250


def test_reload_takes_new_domains_limits_and_lists_and_keeps_code_plugins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "mailgate.toml"
    config.write_text(BEFORE)
    server = Server(load(config))
    seen: list[str] = []

    @server.on_rcpt
    def note(session: Session, envelope: Envelope, address: Address) -> None:
        seen.append(str(address))

    async def main() -> None:
        async with server:
            port = server.address[1]
            assert await asyncio.to_thread(rcpt, port, "a@sender.test", "x@one.test") == 250
            assert await asyncio.to_thread(rcpt, port, "a@sender.test", "x@two.test") == 554
            assert await asyncio.to_thread(rcpt, port, "a@spam.test", "x@one.test") == 250
            old_chain = list(server.hooks.plugins())

            config.write_text(AFTER)
            server.reload(load(config))

            assert await asyncio.to_thread(rcpt, port, "a@sender.test", "x@one.test") == 554
            assert await asyncio.to_thread(rcpt, port, "a@sender.test", "x@two.test") == 250
            assert await asyncio.to_thread(rcpt, port, "a@spam.test", "x@two.test") == 550
            # 2 messages an hour now; none was counted as a message before (no DATA).
            codes = [await asyncio.to_thread(send, port, "y@two.test") for _ in range(3)]
            assert codes == [250, 250, 450]
            names = server.hooks.names()
            assert "lists" in names and names[-1] == "rcpt:" + note.__qualname__
            rebuilt = {"rate-limits", "relay"}
            old = [plugin for plugin in old_chain if getattr(plugin, "name", "") in rebuilt]
            assert len(old) == 2 and not any(p in server.hooks.plugins() for p in old)

    asyncio.run(main())
    assert "x@two.test" in seen and "y@two.test" in seen  # the code hook ran after the reload


def test_a_broken_file_keeps_the_old_chain_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "mailgate.toml"
    config.write_text(BEFORE)
    server = Server(load(config))

    async def main() -> None:
        async with server:
            port = server.address[1]
            chain = server.hooks.plugins()
            config.write_text(BROKEN)
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="mailgate"):
                server.reload(load(config))
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1, errors
            assert errors[0].startswith("reload: configuration not reloaded, the old one runs on")
            assert "mailgate.toml [limits] messages_per_ip" in errors[0]
            assert "configuration reloaded" not in caplog.text
            assert server.hooks.plugins() == chain
            assert server.options.local_domains == ("one.test",)
            # The old settings answer: one.test is still ours, two.test is not.
            assert await asyncio.to_thread(rcpt, port, "a@sender.test", "x@one.test") == 250
            assert await asyncio.to_thread(rcpt, port, "a@sender.test", "x@two.test") == 554

            config.write_text(AFTER)  # fixed: the next SIGHUP takes it
            server.reload(load(config))
            assert await asyncio.to_thread(rcpt, port, "a@sender.test", "x@two.test") == 250

    asyncio.run(main())


def test_a_session_in_progress_runs_the_new_chain_from_its_next_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "mailgate.toml"
    config.write_text(BEFORE)
    server = Server(load(config))

    def open_session(port: int) -> smtplib.SMTP:
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
        smtp.ehlo("client.test")
        assert smtp.mail("a@sender.test")[0] == 250
        assert smtp.rcpt("x@one.test")[0] == 250
        return smtp

    def finish(smtp: smtplib.SMTP) -> tuple[int, int]:
        with smtp:
            later = smtp.rcpt("x@two.test")[0]
            code = smtp.data(b"Subject: x\r\n\r\nx\r\n")[0]
            return later, code

    async def main() -> None:
        async with server:
            smtp = await asyncio.to_thread(open_session, server.address[1])
            config.write_text(AFTER)
            server.reload(load(config))
            # The recipient accepted before stays accepted; the next RCPT sees two.test.
            assert await asyncio.to_thread(finish, smtp) == (250, 250)

    asyncio.run(main())


def test_a_reload_of_the_same_file_keeps_rate_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "mailgate.toml"
    config.write_text(AFTER)
    server = Server(load(config))

    async def main() -> None:
        async with server:
            port = server.address[1]
            assert await asyncio.to_thread(send, port, "y@two.test") == 250
            assert await asyncio.to_thread(send, port, "y@two.test") == 250
            server.reload(load(config))
            assert await asyncio.to_thread(send, port, "y@two.test") == 450

    asyncio.run(main())


def test_sighup_to_mailgate_serve(tmp_path: Path) -> None:
    config = tmp_path / "mailgate.toml"
    config.write_text(BEFORE.replace('listen = "127.0.0.1:0"\n', ""))
    server: CLIServer | None = None
    for _ in range(5):
        port = free_port()
        candidate = CLIServer(
            ["--config", str(config), "--listen", f"127.0.0.1:{port}"], tmp_path
        ).start()
        if candidate.ports:
            server = candidate
            break
        candidate.kill()
    assert server is not None
    try:
        assert rcpt(server.port, "a@sender.test", "x@two.test") == 554
        config.write_text(BROKEN.replace('listen = "127.0.0.1:0"\n', ""))
        server.signal(signal.SIGHUP)
        assert wait_for(lambda: "configuration not reloaded" in server.text()), server.text()
        assert rcpt(server.port, "a@sender.test", "x@one.test") == 250

        config.write_text(AFTER.replace('listen = "127.0.0.1:0"\n', ""))
        server.signal(signal.SIGHUP)
        assert wait_for(lambda: "configuration reloaded" in server.text()), server.text()
        assert rcpt(server.port, "a@sender.test", "x@two.test") == 250
        assert rcpt(server.port, "a@spam.test", "x@two.test") == 550
        assert server.stop() == 0
    finally:
        server.kill()
