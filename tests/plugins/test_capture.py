"""The honeypot auth backend: every attempt recorded as a JSON line, then refused or
accepted, with aiosmtplib sending each mechanism to a real server."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from tests.server.harness import Certs, make_certs

from mailgate import Server
from mailgate.hooks import HookError, Session
from mailgate.plugins.capture import FILENAME, AuthCapture, CaptureError
from mailgate.server.errors import StartupError


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@asynccontextmanager
async def honeypot(
    tmp_path: Path, certs: Certs, plugin: AuthCapture | None = None, **settings: Any
) -> AsyncIterator[tuple[Server, list[tuple[str | None, str | None]]]]:
    settings = {"allow_insecure_auth": True, "auth_failure_delay": 0, **settings}
    server = Server(
        hostname="mx.test",
        listen="127.0.0.1:0",
        state_dir=tmp_path / "state",
        tls_cert=certs.cert,
        tls_key=certs.key,
        **settings,
    )
    if plugin is not None:
        server.add_plugin(plugin)
    users: list[tuple[str | None, str | None]] = []

    @server.on_mail
    def who(session: Session, envelope: Any, address: str) -> None:
        users.append((session.user, session.auth_mechanism))

    async with server:
        yield server, users


async def connect(server: Server) -> aiosmtplib.SMTP:
    host, port = server.address
    client = aiosmtplib.SMTP(
        hostname=host, port=port, start_tls=False, timeout=10, local_hostname="bot.example"
    )
    await client.connect()
    await client.ehlo()
    return client


def captures(state_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state_dir / FILENAME).read_text().splitlines()]


SENT = [
    ("PLAIN", "admin", "123456"),
    ("LOGIN", "root", "pa:ss wörd"),
    ("CRAM-MD5", "info@example.com", "letmein"),
    ("XOAUTH2", "someone@example.com", "ya29.a0AfH6SM"),
]


def auth_call(client: aiosmtplib.SMTP, mechanism: str) -> Callable[[str, str], Awaitable[Any]]:
    return {
        "PLAIN": client.auth_plain,
        "LOGIN": client.auth_login,
        "CRAM-MD5": client.auth_crammd5,
        "XOAUTH2": client.auth_xoauth2,
    }[mechanism]


async def send_each(client: aiosmtplib.SMTP) -> list[int]:
    """Every mechanism of SENT on one connection; the reply codes."""
    codes = []
    for mechanism, user, secret in SENT:
        try:
            codes.append((await auth_call(client, mechanism)(user, secret)).code)
        except aiosmtplib.SMTPAuthenticationError as exc:
            codes.append(exc.code)
            assert exc.message == "5.7.8 Authentication credentials invalid"
    return codes


def test_refuse_records_every_mechanism(
    tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailgate.plugins.capture")

    async def main() -> tuple[str, int]:
        # Built from the setting, as `mailgate serve --auth-capture refuse` does.
        async with honeypot(tmp_path, certs, auth_capture="refuse", max_auth_failures=10) as (
            server,
            users,
        ):
            client = await connect(server)
            assert sorted(client.server_auth_methods) == ["cram-md5", "login", "plain", "xoauth2"]
            assert await send_each(client) == [535, 535, 535, 535]
            await client.mail("a@example.com")
            local_port = client.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
            await client.quit()
            assert users == [(None, None)]
            return server.address[0], local_port

    peer_ip, peer_port = asyncio.run(main())
    records = captures(tmp_path / "state")
    assert [(r["mechanism"], r["username"]) for r in records] == [(m, u) for m, u, _ in SENT]
    plain, login, cram, xoauth2 = records
    assert plain["password"] == "123456"
    assert login["password"] == "pa:ss wörd"
    assert xoauth2["token"] == "ya29.a0AfH6SM"
    assert "password" not in xoauth2 and "token" not in plain
    # CRAM-MD5: the challenge and the client's HMAC of it, enough to test guesses offline.
    expected = hmac.new(b"letmein", cram["challenge"].encode(), hashlib.md5).hexdigest()
    assert cram["digest"] == expected
    assert cram["challenge"].startswith("<") and cram["challenge"].endswith("@mx.test>")
    assert "password" not in cram
    for number, record in enumerate(records, 1):
        assert record["attempt"] == number
        assert record["result"] == "refused"
        assert record["peer_ip"] == peer_ip and record["peer_port"] == peer_port
        assert record["helo"] == "bot.example"
        assert record["tls"] is False
        assert record["session"] == records[0]["session"]
        assert record["time"].endswith("Z")
    logged = [r.getMessage() for r in caplog.records if r.name == "mailgate.plugins.capture"]
    assert len(logged) == 4
    assert "captured AUTH PLAIN for 'admin'" in logged[0] and "refused" in logged[0]
    assert not any("123456" in line for line in logged), "passwords belong in the file only"
    assert (tmp_path / "state" / FILENAME).stat().st_mode & 0o777 == 0o600


def test_accept_lets_everyone_in_as_themselves(tmp_path: Path, certs: Certs) -> None:
    async def main() -> list[tuple[str | None, str | None]]:
        async with honeypot(tmp_path, certs, auth_capture="accept") as (server, users):
            for mechanism, user, secret in SENT:
                client = await connect(server)
                assert (await auth_call(client, mechanism)(user, secret)).code == 235
                await client.mail("a@example.com")
                await client.quit()
            return users

    users = asyncio.run(main())
    assert users == [(user, mechanism) for mechanism, user, _ in SENT]
    records = captures(tmp_path / "state")
    assert [r["result"] for r in records] == ["accepted"] * 4
    assert records[0]["password"] == "123456"


def test_accept_after_n_attempts_per_session(tmp_path: Path, certs: Certs) -> None:
    state = tmp_path / "capture"
    plugin = AuthCapture("accept-after", state, accept_after=2)

    async def main() -> list[tuple[str | None, str | None]]:
        async with honeypot(tmp_path, certs, plugin) as (server, users):
            for _ in range(2):  # counted per session: each connection starts again
                client = await connect(server)
                with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                    await client.auth_plain("admin", "admin")
                assert (await client.auth_login("admin", "password")).code == 235
                await client.mail("a@example.com")
                await client.quit()
                # Log rotation by renaming: the next line goes to a new file.
                (state / FILENAME).rename(state / f"{FILENAME}.{len(users)}")
            return users

    users = asyncio.run(main())
    assert users == [("admin", "LOGIN"), ("admin", "LOGIN")]
    first = [json.loads(line) for line in (state / f"{FILENAME}.1").read_text().splitlines()]
    second = [json.loads(line) for line in (state / f"{FILENAME}.2").read_text().splitlines()]
    for records in (first, second):
        assert [(r["attempt"], r["result"], r["password"]) for r in records] == [
            (1, "refused", "admin"),
            (2, "accepted", "password"),
        ]
    assert first[0]["session"] != second[0]["session"]


def test_over_tls(tmp_path: Path, certs: Certs) -> None:
    async def main() -> None:
        async with honeypot(tmp_path, certs, auth_capture="refuse", allow_insecure_auth=False) as (
            server,
            _,
        ):
            client = await connect(server)
            context = ssl.create_default_context(cafile=str(certs.ca_file))
            await client.starttls(tls_context=context, server_hostname="localhost")
            await client.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await client.auth_plain("admin", "admin")
            await client.quit()

    asyncio.run(main())
    (record,) = captures(tmp_path / "state")
    assert record["tls"] is True and record["password"] == "admin"


def test_bad_arguments_and_unwritable_state_dir(tmp_path: Path, certs: Certs) -> None:
    for mode, after in (("maybe", None), ("accept-after", None), ("accept-after", 0)):
        with pytest.raises(CaptureError):
            AuthCapture(mode, tmp_path, accept_after=after)
    with pytest.raises(CaptureError, match="only for mode accept-after"):
        AuthCapture("refuse", tmp_path, accept_after=2)

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CaptureError) as error:
        AuthCapture("refuse", blocker / "state")
    assert isinstance(error.value, HookError) and isinstance(error.value, ValueError)
    assert str(error.value).startswith(f"cannot open the auth capture file {blocker}/state/")

    async def start() -> str:
        server = Server(
            listen="127.0.0.1:0",
            state_dir=blocker / "state",
            tls_cert=certs.cert,
            tls_key=certs.key,
            auth_capture="refuse",
        )
        with pytest.raises(StartupError) as failed:
            await server.start()
        return str(failed.value)

    message = asyncio.run(start())
    assert "cannot open the auth capture file" in message and "\n" not in message
