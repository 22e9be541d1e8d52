"""The core SMTPServer: no plugins of its own, start_plugins, close_session; and the
mailgate.Server facade built on it."""

from __future__ import annotations

import asyncio
import smtplib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mailgate import Server
from mailgate.hooks import Session
from mailgate.protocol import Reply
from mailgate.server import ListenAddress, ServerOptions, SMTPServer, StartPlugins, StartupError


def options(tmp_path: Path, **fields: Any) -> ServerOptions:
    return ServerOptions(
        listen=(ListenAddress("127.0.0.1", 0),),
        hostname="mx.test",
        maildir=tmp_path / "maildir",
        state_dir=tmp_path / "state",
        **fields,
    )


class Named:
    def __init__(self, name: str) -> None:
        self.name = name

    async def on_rcpt(self, session: Session, envelope: Any, address: Any) -> None:
        return None


class Assembled(SMTPServer):
    """A server that assembles its own plugins, as a program (or a mode) would."""

    asked = 0

    def start_plugins(self) -> StartPlugins:
        self.asked += 1
        return StartPlugins(first=[Named("first-a"), Named("first-b")], last=[Named("last")])


def test_the_core_server_adds_no_plugin(tmp_path: Path) -> None:
    async def main() -> tuple[list[str], list[str]]:
        core = SMTPServer(options(tmp_path))
        facade = Server(options(tmp_path))
        async with core, facade:
            return core.hooks.names(), facade.hooks.names()

    core_names, facade_names = asyncio.run(main())
    assert core_names == []
    assert "maildir" in facade_names and "relay" in facade_names


def test_start_plugins_go_around_the_code_registered_ones_once(tmp_path: Path) -> None:
    async def main() -> tuple[list[str], int]:
        server = Assembled(options(tmp_path, delivery="sink"))
        server.add_plugin(Named("mine"))
        await server.start()
        await server.stop()
        await server.start()  # a second start does not add them again
        await server.stop()
        return server.hooks.names(), server.asked

    names, asked = asyncio.run(main())
    assert names == ["first-a", "first-b", "mine", "last"]
    assert asked == 1


@pytest.mark.parametrize("error", [ValueError("bad list file"), OSError("cannot read it")])
def test_an_error_in_start_plugins_is_a_startup_error(tmp_path: Path, error: Exception) -> None:
    class Failing(SMTPServer):
        def start_plugins(self) -> StartPlugins:
            raise error

    async def main() -> None:
        await Failing(options(tmp_path, delivery="sink")).start()

    with pytest.raises(StartupError, match=str(error)):
        asyncio.run(main())


def test_the_facade_takes_settings_or_options_not_both(tmp_path: Path) -> None:
    assert Server(hostname="mx.example.com").options.hostname == "mx.example.com"
    with pytest.raises(TypeError):
        Server(options(tmp_path), hostname="mx.example.com")
    with pytest.raises(ValueError, match="max_size"):
        Server(max_size="lots")
    assert isinstance(Server(options(tmp_path)), SMTPServer)


class Recorder:
    """A session recorder keeping only what the close_session tests look at."""

    def __init__(self) -> None:
        self.closes: list[tuple[str, str]] = []
        self.writes: list[bytes] = []

    def opened(self, session: Session) -> None:
        pass

    def received(self, session: Session, line: bytes) -> None:
        pass

    def sent(self, session: Session, data: bytes) -> None:
        self.writes.append(data)

    def tls(self, session: Session) -> None:
        pass

    def closed(self, session: Session, reason: str) -> None:
        self.closes.append((session.id, reason))


KICKED = Reply(421, "4.4.2", ("mx.test Kicked by the operator",))


def test_close_session_sends_the_reply_and_closes(tmp_path: Path) -> None:
    recorder = Recorder()

    async def main() -> tuple[bytes, bytes, bool, bool, str]:
        server = SMTPServer(options(tmp_path, delivery="sink"))
        server.recorder = recorder
        sessions: list[Session] = []
        server.on_connect(sessions.append)
        async with server:
            host, port = server.address
            reader, writer = await asyncio.open_connection(host, port)
            try:
                banner = await asyncio.wait_for(reader.readline(), 5)
                closed = server.close_session(sessions[0], KICKED, "kicked")
                rest = await asyncio.wait_for(reader.read(), 5)  # up to EOF
                # Once the connection is gone there is nothing to close.
                for _ in range(100):
                    if not server.connections:
                        break
                    await asyncio.sleep(0.01)
                again = server.close_session(sessions[0], KICKED, "kicked")
            finally:
                writer.close()
        return banner, rest, closed, again, sessions[0].id

    banner, rest, closed, again, session_id = asyncio.run(main())
    assert banner.startswith(b"220 ")
    # Outside the dialogue: no enhanced code (the client may never have sent EHLO).
    assert rest == b"421 mx.test Kicked by the operator\r\n"
    assert closed is True and again is False
    assert recorder.closes == [(session_id, "kicked")]
    assert recorder.writes[-1] == rest


def test_close_session_of_another_servers_session_is_false(tmp_path: Path) -> None:
    async def main() -> bool:
        server = SMTPServer(options(tmp_path, delivery="sink"))
        async with server:
            stranger = Session(
                id="x", peer_host="192.0.2.1", peer_port=1, local_host="127.0.0.1", local_port=25
            )
            return server.close_session(stranger, KICKED)

    assert asyncio.run(main()) is False


def test_the_session_says_which_kind_of_listener_the_client_came_in_on(tmp_path: Path) -> None:
    """The core marks sessions of submission listeners (ListenAddress.submission) and
    leaves the rules to plugins: with no plugin, both listeners take mail alike."""

    seen: dict[int, bool] = {}

    async def main() -> dict[str, int]:
        listen = (ListenAddress("127.0.0.1", 0), ListenAddress("127.0.0.1", 0, submission=True))
        server = SMTPServer(replace(options(tmp_path, delivery="sink"), listen=listen))

        @server.on_mail
        def note(session: Session, envelope: Any, address: Any) -> None:
            seen[session.local_port] = session.submission

        async with server:
            ports = {
                ("submission" if address.submission else "plain"): bound[1]
                for address, bound in server.listening
            }

            def send(port: int) -> None:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                    client.ehlo("client.test")
                    assert client.mail("a@example.com")[0] == 250

            for port in ports.values():
                await asyncio.to_thread(send, port)
        return ports

    ports = asyncio.run(main())
    assert seen == {ports["plain"]: False, ports["submission"]: True}
