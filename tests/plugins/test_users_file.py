"""The users-file auth backend: argon2 hashes, off the event loop, reload, rehash, and
end to end with ``mailgate users`` and a real server."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from argon2 import PasswordHasher, extract_parameters
from tests.server.harness import Certs, make_certs

from mailgate import Server, cli
from mailgate.hooks import HookError
from mailgate.plugins.users_file import (
    UsersDocument,
    UsersFile,
    UsersFileError,
    read_document,
    write_document,
)
from mailgate.server.errors import StartupError


# Small parameters keep the tests fast; production uses argon2-cffi's defaults.
def fast() -> PasswordHasher:
    return PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)


class SpyHasher(PasswordHasher):
    """A real PasswordHasher that also notes which hash each verify() used, and where."""

    def __init__(self, *, time_cost: int, memory_cost: int, parallelism: int) -> None:
        super().__init__(time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism)
        self.verified: list[tuple[str, int]] = []

    def verify(self, hash: str | bytes, password: str | bytes) -> Any:
        text = hash.decode() if isinstance(hash, bytes) else hash
        self.verified.append((text, threading.get_ident()))
        return super().verify(hash, password)


def users_file(path: Path, users: dict[str, str], hasher: PasswordHasher, header: str = "") -> Path:
    lines = [header] if header else []
    lines += [f"{name}:{hasher.hash(password)}" for name, password in users.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@asynccontextmanager
async def serving(
    tmp_path: Path, certs: Certs, plugin: UsersFile | None = None, **settings: Any
) -> AsyncIterator[Server]:
    server = Server(
        hostname="mx.test",
        listen="127.0.0.1:0",
        state_dir=tmp_path / "state",
        tls_cert=certs.cert,
        tls_key=certs.key,
        allow_insecure_auth=True,
        auth_failure_delay=0,
        **settings,
    )
    if plugin is not None:
        server.add_plugin(plugin)
    async with server:
        yield server


async def auth(server: Server, user: str, password: str, *, mechanism: str = "PLAIN") -> str:
    """One AUTH on a fresh connection: the reply as "code text"."""
    host, port = server.address
    client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
    await client.connect()
    try:
        await client.ehlo()
        call = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        try:
            response = await call(user, password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            return f"{exc.code} {exc.message}"
        return f"{response.code} {response.message}"
    finally:
        client.close()


REFUSED = "535 5.7.8 Authentication credentials invalid"
ACCEPTED = "235 2.7.0 Authentication succeeded"


# --- the file format ---------------------------------------------------------------------------


def test_format_comments_blank_lines_and_errors() -> None:
    hasher = fast()
    h1, h2 = hasher.hash("one"), hasher.hash("two")
    doc = UsersDocument.parse(f"# users\r\n\r\nalice:{h1}\r\n  # indented comment\nbob: {h2} \n")
    assert doc.users() == {"alice": h1, "bob": h2}

    bad = {
        "alice\n": "line 1: expected 'username:argon2-hash'",
        f"al ice:{h1}\n": "line 1: a user name cannot contain white space",
        f"# ok\nal\x01ice:{h1}\n": "line 2: a user name cannot contain control characters",
        "alice:secret\n": "line 1: not an argon2 hash",
        "alice:$argon2id$nonsense\n": "line 1: not a valid argon2 hash",
        f"alice:{h1}\nbob:{h2}\nalice:{h2}\n": "line 3: user 'alice' is already defined on line 1",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError) as error:
            UsersDocument.parse(text)
        assert str(error.value) == message
        assert "$argon2" not in str(error.value), "an error message must not show a hash"


def test_document_edits_keep_comments_and_order() -> None:
    doc = UsersDocument.parse("# head\na:$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA\n# mid\n")
    assert doc.set("b", "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$b3RoZXI") is False
    assert doc.set("a", "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$bmV3") is True
    assert doc.remove("x") is False
    assert doc.remove("a") is True
    assert doc.render() == "# head\n# mid\nb:$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$b3RoZXI\n"
    assert doc.hash_of("b").endswith("$b3RoZXI")


# --- start-up errors ---------------------------------------------------------------------------


def test_bad_file_at_start_is_a_one_line_startup_error(tmp_path: Path, certs: Certs) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UsersFileError) as error:
        UsersFile(missing)
    assert isinstance(error.value, HookError) and isinstance(error.value, ValueError)
    assert str(error.value) == (
        f"users file {missing} does not exist; create it with: "
        f"mailgate users add USER --file {missing}"
    )

    broken = tmp_path / "broken"
    broken.write_text("# fine\nalice:plaintext\n")
    directory = tmp_path / "adir"
    directory.mkdir()
    expected = {
        missing: "does not exist",
        broken: f"users file {broken}: line 2: not an argon2 hash",
        directory: f"cannot read users file {directory}",
    }

    async def start(path: Path) -> str:
        server = Server(
            listen="127.0.0.1:0",
            state_dir=tmp_path / "state",
            tls_cert=certs.cert,
            tls_key=certs.key,
            users_file=path,
        )
        with pytest.raises(StartupError) as failed:
            await server.start()
        return str(failed.value)

    for path, needle in expected.items():
        message = asyncio.run(start(path))
        assert needle in message
        assert "\n" not in message


# --- logging in ----------------------------------------------------------------------------------


def test_plain_and_login_against_the_file(tmp_path: Path, certs: Certs) -> None:
    hasher = fast()
    path = users_file(tmp_path / "users", {"alice": "pässword", "bob": "hunter2"}, hasher)
    plugin = UsersFile(path, hasher=hasher)
    assert sorted(plugin.usernames) == ["alice", "bob"]

    async def main() -> None:
        async with serving(tmp_path, certs, plugin) as server:
            host, port = server.address
            client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
            await client.connect()
            await client.ehlo()
            # Only mechanisms that carry the password can be checked against a hash.
            assert sorted(client.server_auth_methods) == ["login", "plain"]
            client.close()

            assert await auth(server, "alice", "pässword") == ACCEPTED
            assert await auth(server, "bob", "hunter2", mechanism="LOGIN") == ACCEPTED
            assert await auth(server, "alice", "hunter2") == REFUSED
            assert await auth(server, "alice", "") == REFUSED
            assert await auth(server, "carol", "hunter2") == REFUSED
            assert await auth(server, "Alice", "pässword") == REFUSED  # names are exact

            # authzid: acting for oneself is fine, for somebody else it is not.
            for authzid, expected in (("alice", 235), ("bob", 535)):
                client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
                await client.connect()
                await client.ehlo()
                blob = base64.b64encode(f"{authzid}\0alice\0pässword".encode())
                response = await client.execute_command(b"AUTH", b"PLAIN", blob)
                assert response.code == expected
                client.close()

    asyncio.run(main())


def test_verify_runs_in_a_thread_and_unknown_users_cost_a_verification(
    tmp_path: Path, certs: Certs
) -> None:
    maker = fast()
    slower = PasswordHasher(time_cost=2, memory_cost=64, parallelism=1)
    path = tmp_path / "users"
    # Two users with one set of parameters, one with another: the dummy hash must look
    # like the majority, so an unknown name costs what a typical known one does.
    path.write_text(f"alice:{slower.hash('a')}\nbob:{slower.hash('b')}\ncarol:{maker.hash('c')}\n")
    spy = SpyHasher(time_cost=1, memory_cost=64, parallelism=1)
    plugin = UsersFile(path, hasher=spy, rehash=False)
    stored = read_document(path).users()

    async def main() -> int:
        async with serving(tmp_path, certs, plugin) as server:
            assert await auth(server, "alice", "a") == ACCEPTED
            assert await auth(server, "alice", "wrong") == REFUSED
            assert await auth(server, "mallory", "a") == REFUSED
            assert await auth(server, "mallory", "b") == REFUSED
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert len(spy.verified) == 4, "exactly one argon2 verification per attempt"
    assert all(thread != loop_thread for _, thread in spy.verified), "argon2 on the event loop"
    (known1, _), (known2, _), (dummy1, _), (dummy2, _) = spy.verified
    assert known1 == known2 == stored["alice"]
    assert dummy1 == dummy2
    assert dummy1 not in stored.values()
    assert extract_parameters(dummy1) == extract_parameters(stored["alice"])


def test_reload_on_change_and_keep_old_users_when_broken(
    tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    hasher = fast()
    path = users_file(tmp_path / "users", {"alice": "a"}, hasher)
    plugin = UsersFile(path, hasher=hasher, check_interval=0.05)

    async def until(server: Server, user: str, password: str, expected: str) -> None:
        deadline = time.monotonic() + 5
        while (reply := await auth(server, user, password)) != expected:
            assert time.monotonic() < deadline, f"{user}: still {reply}"
            await asyncio.sleep(0.05)

    async def main() -> None:
        async with serving(tmp_path, certs, plugin) as server:
            assert await auth(server, "bob", "b") == REFUSED
            doc = read_document(path)
            doc.set("bob", hasher.hash("b"))
            write_document(path, doc)
            await until(server, "bob", "b", ACCEPTED)

            # Gone: the users loaded before stay, and the error is logged once.
            path.unlink()
            await asyncio.sleep(0.1)
            for _ in range(3):
                assert await auth(server, "bob", "b") == ACCEPTED
                await asyncio.sleep(0.06)
            gone = [r for r in caplog.records if "does not exist" in r.getMessage()]
            assert len(gone) == 1 and gone[0].levelno == logging.ERROR
            assert "keeping the 2 users loaded before" in gone[0].getMessage()

            # Broken: likewise.
            path.write_text(f"alice:{hasher.hash('a')}\nbob\n")
            await asyncio.sleep(0.1)
            assert await auth(server, "bob", "b") == ACCEPTED
            assert any("line 2" in r.getMessage() for r in caplog.records)

            # Fixed: the new content counts, bob is gone.
            users_file(path, {"alice": "new"}, hasher)
            await until(server, "bob", "b", REFUSED)
            assert await auth(server, "alice", "new") == ACCEPTED
            assert plugin.usernames == ["alice"]

    asyncio.run(main())


def test_rehash_rewrites_only_the_user_and_keeps_the_file(tmp_path: Path, certs: Certs) -> None:
    old = fast()
    new = PasswordHasher(time_cost=2, memory_cost=64, parallelism=1)
    path = users_file(tmp_path / "users", {"alice": "a", "bob": "b"}, old, header="# team")
    os.chmod(path, 0o640)
    before = path.read_text().splitlines()

    async def main(plugin: UsersFile) -> None:
        async with serving(tmp_path, certs, plugin) as server:
            assert await auth(server, "alice", "a") == ACCEPTED
            assert await auth(server, "alice", "a") == ACCEPTED

    asyncio.run(main(UsersFile(path, hasher=new, rehash=False)))
    assert path.read_text().splitlines() == before

    asyncio.run(main(UsersFile(path, hasher=new)))
    after = path.read_text().splitlines()
    assert after[0] == "# team" and after[2] == before[2]  # the comment and bob: untouched
    assert after[1] != before[1]
    assert not new.check_needs_rehash(after[1].partition(":")[2])
    assert new.verify(after[1].partition(":")[2], "a")
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".users")] == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_no_rehash_of_a_file_owned_by_someone_else(tmp_path: Path, certs: Certs) -> None:
    old = fast()
    path = users_file(tmp_path / "users", {"alice": "a"}, old)
    os.chown(path, 65534, -1)
    before = path.read_text()
    plugin = UsersFile(path, hasher=PasswordHasher(time_cost=2, memory_cost=64, parallelism=1))

    async def main() -> None:
        async with serving(tmp_path, certs, plugin) as server:
            assert await auth(server, "alice", "a") == ACCEPTED

    asyncio.run(main())
    assert path.read_text() == before
    assert os.stat(path).st_uid == 65534


# --- end to end: mailgate users + mailgate's users_file setting ---------------------------------


def test_users_command_and_server_end_to_end(
    tmp_path: Path, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "users"
    monkeypatch.setattr(sys, "stdin", io.StringIO("correct horse\n"))
    assert cli.main(["users", "add", "alice", "--file", str(path), "--password-stdin"]) == 0

    async def main() -> float:
        async with serving(tmp_path, certs, users_file=path) as server:
            assert await auth(server, "alice", "correct horse") == ACCEPTED
            assert await auth(server, "alice", "correct horsE", mechanism="LOGIN") == REFUSED

            assert cli.main(["users", "remove", "alice", "--file", str(path)]) == 0
            started = time.monotonic()
            # The file is looked at once a second at most: bounded polling.
            while await auth(server, "alice", "correct horse") == ACCEPTED:
                assert time.monotonic() - started < 5, "the removal never took effect"
                await asyncio.sleep(0.1)
            return time.monotonic() - started

    took = asyncio.run(main())
    assert took < 2.5


def test_users_file_and_static_users_each_answer_for_their_own_users(
    tmp_path: Path, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A backend that does not know a user leaves the decision to the next one; only when
    # none knows it does the server refuse (535).
    path = tmp_path / "users"
    monkeypatch.setattr(sys, "stdin", io.StringIO("from the file\n"))
    assert cli.main(["users", "add", "carol", "--file", str(path), "--password-stdin"]) == 0

    async def main() -> None:
        async with serving(
            tmp_path, certs, users_file=path, auth_users=["dave:on the command line"]
        ) as server:
            assert await auth(server, "carol", "from the file") == ACCEPTED
            assert await auth(server, "dave", "on the command line") == ACCEPTED
            assert await auth(server, "dave", "from the file") == REFUSED
            assert await auth(server, "carol", "on the command line") == REFUSED
            assert await auth(server, "nobody", "from the file") == REFUSED

    asyncio.run(main())
