"""AUTH with a callback backend (``@server.on_auth``): every mechanism with aiosmtplib as
the client, TLS before AUTH, the growing delay after failures and the disconnect."""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from tests.server.harness import Certs, make_certs

from mailgate import Server
from mailgate.hooks import AuthAttempt, Session

MECHANISMS = ["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"]
PASSWORD = "s3cret pass"
TOKEN = "ya29.token-for-alice"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


class Recorder:
    """The callback backend under test, and what it saw."""

    def __init__(self) -> None:
        self.attempts: list[AuthAttempt] = []
        self.mail_users: list[tuple[str | None, str | None]] = []

    async def check(self, session: Session, auth: AuthAttempt) -> bool:
        self.attempts.append(auth)
        if auth.username != "alice":
            return False
        if auth.method == "XOAUTH2":
            return auth.token == TOKEN
        return auth.verify(PASSWORD)

    def mail(self, session: Session, envelope: Any, address: str) -> None:
        self.mail_users.append((session.user, session.auth_mechanism))


@asynccontextmanager
async def callback_server(
    tmp_path: Path, certs: Certs, **settings: Any
) -> AsyncIterator[tuple[Server, Recorder]]:
    settings = {
        "allow_insecure_auth": True,
        "auth_failure_delay": 0,
        "auth_mechanisms": MECHANISMS,
        **settings,
    }
    server = Server(
        hostname="mx.test",
        listen="127.0.0.1:0",
        state_dir=tmp_path / "state",
        tls_cert=certs.cert,
        tls_key=certs.key,
        **settings,
    )
    recorder = Recorder()
    server.on_auth(recorder.check)
    server.on_mail(recorder.mail)
    async with server:
        yield server, recorder


async def connect(server: Server) -> aiosmtplib.SMTP:
    host, port = server.address
    client = aiosmtplib.SMTP(
        hostname=host, port=port, start_tls=False, timeout=10, local_hostname="client.test"
    )
    await client.connect()
    await client.ehlo()
    return client


def login_call(client: aiosmtplib.SMTP, mechanism: str) -> Callable[[str, str], Awaitable[Any]]:
    return {
        "PLAIN": client.auth_plain,
        "LOGIN": client.auth_login,
        "CRAM-MD5": client.auth_crammd5,
        "XOAUTH2": client.auth_xoauth2,
    }[mechanism]


def secret_for(mechanism: str, *, right: bool) -> str:
    if mechanism == "XOAUTH2":
        return TOKEN if right else "ya29.stolen"
    return PASSWORD if right else "s3cret pasS"


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_each_mechanism_succeeds_and_fails(tmp_path: Path, certs: Certs, mechanism: str) -> None:
    async def main() -> None:
        async with callback_server(tmp_path, certs) as (server, seen):
            client = await connect(server)
            assert set(client.server_auth_methods) == {m.lower() for m in MECHANISMS}
            response = await login_call(client, mechanism)(
                "alice", secret_for(mechanism, right=True)
            )
            assert response.code == 235
            await client.mail("a@example.com")
            await client.quit()
            assert seen.mail_users == [("alice", mechanism)]

            client = await connect(server)
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
                await login_call(client, mechanism)("alice", secret_for(mechanism, right=False))
            assert refused.value.code == 535
            assert refused.value.message.startswith("5.7.8 ")
            # Not authenticated: the session goes on, and nobody is logged in.
            await client.mail("a@example.com")
            await client.quit()
            assert seen.mail_users[-1] == (None, None)

        right, wrong = seen.attempts
        assert right.method == wrong.method == mechanism
        assert right.username == "alice"
        if mechanism in ("PLAIN", "LOGIN"):
            assert (right.password, wrong.password) == (PASSWORD, "s3cret pasS")
        elif mechanism == "XOAUTH2":
            assert (right.token, wrong.token) == (TOKEN, "ya29.stolen")
            assert not right.verify(TOKEN), "verify() is for passwords, never a token"
        else:  # CRAM-MD5: no secret travels, only proof of it
            assert right.password is None and right.token is None

    asyncio.run(main())


def test_unknown_user_is_refused_like_a_wrong_password(tmp_path: Path, certs: Certs) -> None:
    async def main() -> None:
        async with callback_server(tmp_path, certs) as (server, _):
            client = await connect(server)
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
                await client.auth_plain("mallory", PASSWORD)
            assert (refused.value.code, refused.value.message) == (
                535,
                "5.7.8 Authentication credentials invalid",
            )
            await client.quit()

    asyncio.run(main())


def test_mechanisms_declared_on_the_callback(tmp_path: Path, certs: Certs) -> None:
    """Without the setting, the server offers what the callback declares."""

    async def main() -> None:
        server = Server(
            hostname="mx.test",
            listen="127.0.0.1:0",
            state_dir=tmp_path / "state",
            tls_cert=certs.cert,
            tls_key=certs.key,
            allow_insecure_auth=True,
            auth_failure_delay=0,
        )

        def check(session: Session, auth: AuthAttempt) -> bool:  # a plain function works too
            return auth.username == "alice" and auth.verify(PASSWORD)

        check.auth_mechanisms = ("CRAM-MD5",)  # type: ignore[attr-defined]
        server.on_auth(check)
        async with server:
            client = await connect(server)
            assert client.server_auth_methods == ["cram-md5"]
            assert (await client.auth_crammd5("alice", PASSWORD)).code == 235
            await client.quit()

    asyncio.run(main())


def test_plain_callback_offers_plain_and_login(tmp_path: Path, certs: Certs) -> None:
    async def main() -> None:
        server = Server(
            hostname="mx.test",
            listen="127.0.0.1:0",
            state_dir=tmp_path / "state",
            tls_cert=certs.cert,
            tls_key=certs.key,
            allow_insecure_auth=True,
        )
        server.on_auth(lambda session, auth: auth.verify(PASSWORD))
        async with server:
            client = await connect(server)
            assert sorted(client.server_auth_methods) == ["login", "plain"]
            await client.quit()

    asyncio.run(main())


def test_auth_needs_tls_by_default(tmp_path: Path, certs: Certs) -> None:
    async def main() -> None:
        async with callback_server(tmp_path, certs, allow_insecure_auth=False) as (server, seen):
            client = await connect(server)
            assert not client.supports_extension("auth"), "AUTH offered in clear text"
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
                await client.auth_plain("alice", PASSWORD)
            assert refused.value.code == 538
            assert seen.attempts == [], "the password reached the backend without TLS"

            context = ssl.create_default_context(cafile=str(certs.ca_file))
            await client.starttls(tls_context=context, server_hostname="localhost")
            await client.ehlo()
            assert client.supports_extension("auth")
            assert (await client.auth_login("alice", PASSWORD)).code == 235
            await client.mail("a@example.com")
            await client.quit()
            assert seen.mail_users == [("alice", "LOGIN")]

    asyncio.run(main())


def test_failures_are_delayed_more_and_more_then_disconnected(tmp_path: Path, certs: Certs) -> None:
    delay = 0.05

    async def main() -> None:
        async with callback_server(tmp_path, certs, auth_failure_delay=delay) as (server, _):
            client = await connect(server)
            took = []
            for _ in range(3):  # max_auth_failures defaults to 3
                started = time.monotonic()
                with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                    await client.auth_plain("alice", "wrong")
                took.append(time.monotonic() - started)
            # 0.05, 0.1, 0.2 s; a little slack for the event loop's clock resolution.
            assert took[0] >= delay * 0.9
            assert took[1] >= 2 * delay * 0.9
            assert took[2] >= 4 * delay * 0.9
            # After the third failure the server said 421 and hung up.
            with pytest.raises(aiosmtplib.SMTPException) as closed:
                await client.noop()
            if isinstance(closed.value, aiosmtplib.SMTPResponseException):
                assert closed.value.code == 421
            else:
                assert isinstance(closed.value, aiosmtplib.SMTPServerDisconnected)
            client.close()

            # A new connection starts from zero: the base delay, not the fourth step (8x).
            client = await connect(server)
            started = time.monotonic()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await client.auth_plain("alice", "wrong")
            assert delay * 0.9 <= time.monotonic() - started < 8 * delay
            assert (await client.auth_plain("alice", PASSWORD)).code == 235
            await client.quit()

    asyncio.run(main())


def test_max_auth_failures_setting(tmp_path: Path, certs: Certs) -> None:
    """Byte by byte: the failure, the 421, then the server closes."""

    async def main() -> None:
        async with callback_server(tmp_path, certs, max_auth_failures=1) as (server, _):
            reader, writer = await asyncio.open_connection(*server.address)
            credentials = base64.b64encode(b"\0alice\0wrong").decode()
            writer.write(f"EHLO client.test\r\nAUTH PLAIN {credentials}\r\n".encode())
            lines = []
            async with asyncio.timeout(10):
                while line := await reader.readline():
                    lines.append(line.decode())
            writer.close()
            assert lines[0].startswith("220 ")
            assert lines[-2:] == [
                "535 5.7.8 Authentication credentials invalid\r\n",
                "421 4.7.0 Too many errors, closing connection\r\n",
            ]

    asyncio.run(main())


def test_an_auth_hook_that_raises_is_a_temporary_failure(tmp_path: Path, certs: Certs) -> None:
    async def main() -> None:
        server = Server(
            hostname="mx.test",
            listen="127.0.0.1:0",
            state_dir=tmp_path / "state",
            tls_cert=certs.cert,
            tls_key=certs.key,
            allow_insecure_auth=True,
            auth_failure_delay=0,
        )

        @server.on_auth
        async def broken(session: Session, auth: AuthAttempt) -> None:
            raise RuntimeError("the user database is down")

        async with server:
            client = await connect(server)
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
                await client.auth_plain("alice", PASSWORD)
            assert failed.value.code == 451
            assert "the user database" not in failed.value.message
            await client.quit()

    asyncio.run(main())


def test_bad_auth_mechanism_setting_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="DIGEST-MD5"):
        Server(listen="127.0.0.1:0", state_dir=tmp_path, auth_mechanisms=["DIGEST-MD5"])
