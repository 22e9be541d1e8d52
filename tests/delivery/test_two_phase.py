"""Issue 13 item 4: the deliveries of one message succeed or fail as a unit. A local
delivery (Maildir, mbox) next to a forward that fails keeps no copy, so the client's
retries never duplicate it, and a message refused with 5xx is kept nowhere."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from tests.delivery.test_forward import (
    MESSAGE,
    closed_port,
    front_server,
    send,
    target_files,
    target_server,
)
from tests.server.harness import Certs, maildir_messages, make_certs

from mailgate import Reject, Server
from mailgate.hooks import Envelope, Message, Session


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.exists() else []


def test_retries_against_a_down_forward_leave_no_copies(tmp_path: Path, certs: Certs) -> None:
    maildir = tmp_path / "M"

    async def main() -> list[int]:
        url = f"smtp://127.0.0.1:{closed_port()}"
        async with front_server(tmp_path, certs, maildir=maildir, forward=[url]) as front:
            return [
                (await send(front.address[1], "a@example.org", ["b@example.com"]))[0]
                for _ in range(3)
            ]

    assert asyncio.run(main()) == [451, 451, 451]
    assert maildir_messages(maildir) == []
    assert _files(maildir / "tmp") == []  # nothing staged left behind either


def test_a_554_from_the_forward_keeps_no_copy(tmp_path: Path, certs: Certs) -> None:
    maildir = tmp_path / "M"

    async def main() -> tuple[int, str]:
        async with target_server(tmp_path, certs) as (target, _seen):

            @target.on_message
            def refuse(session: Session, envelope: Envelope, message: Message) -> None:
                raise Reject(554, "content refused", enhanced="5.7.1")

            url = f"smtp://127.0.0.1:{target.address[1]}"
            async with front_server(tmp_path, certs, maildir=maildir, forward=[url]) as front:
                return await send(front.address[1], "a@example.org", ["b@example.com"])

    code, _text = asyncio.run(main())
    assert code == 554
    assert maildir_messages(maildir) == []
    assert _files(maildir / "tmp") == []
    assert target_files(tmp_path) == []


def test_both_deliveries_keep_the_message_when_both_accept(tmp_path: Path, certs: Certs) -> None:
    maildir = tmp_path / "M"

    async def main() -> tuple[int, str]:
        async with target_server(tmp_path, certs) as (target, _seen):
            url = f"smtp://127.0.0.1:{target.address[1]}"
            async with front_server(tmp_path, certs, maildir=maildir, forward=[url]) as front:
                return await send(front.address[1], "a@example.org", ["b@example.com"])

    assert asyncio.run(main())[0] == 250
    assert len(maildir_messages(maildir)) == 1
    assert len(target_files(tmp_path)) == 1
    assert _files(maildir / "tmp") == []


def test_mbox_with_a_down_forward_appends_nothing(tmp_path: Path, certs: Certs) -> None:
    mbox = tmp_path / "mail.mbox"

    async def main() -> int:
        url = f"smtp://127.0.0.1:{closed_port()}"
        async with front_server(tmp_path, certs, mbox=mbox, forward=[url]) as front:
            return (await send(front.address[1], "a@example.org", ["b@example.com"]))[0]

    assert asyncio.run(main()) == 451
    assert not mbox.exists() or mbox.read_bytes() == b""


def test_a_later_hook_refusing_rolls_back_and_a_one_phase_hook_still_works(
    tmp_path: Path, certs: Certs
) -> None:
    """A third-party message hook with only on_message (one phase) runs as before; its
    refusal rolls back the staged Maildir delivery ahead of it."""
    maildir = tmp_path / "M"
    seen: list[str] = []

    async def main() -> list[int]:
        server = Server(
            hostname="front.test",
            listen="127.0.0.1:0",
            state_dir=tmp_path / "state",
            tls_cert=certs.cert,
            tls_key=certs.key,
            maildir=maildir,
        )

        @server.on_message(after="maildir")
        def archive(session: Session, envelope: Envelope, message: Message) -> Any:
            seen.append(message.id)
            if envelope.sender == "spam@example.org":
                raise Reject(550, "no thanks")
            return None

        async with server:
            port = server.address[1]
            return [
                (await send(port, "spam@example.org", ["b@example.com"]))[0],
                (await send(port, "a@example.org", ["b@example.com"], MESSAGE))[0],
            ]

    assert asyncio.run(main()) == [550, 250]
    assert len(seen) == 2
    assert len(maildir_messages(maildir)) == 1
    assert _files(maildir / "tmp") == []


def test_a_failed_commit_is_answered_451(tmp_path: Path, certs: Certs) -> None:
    maildir = tmp_path / "M"
    aborted: list[str] = []

    async def main() -> int:
        server = Server(
            hostname="front.test",
            listen="127.0.0.1:0",
            state_dir=tmp_path / "state",
            tls_cert=certs.cert,
            tls_key=certs.key,
            maildir=maildir,
        )

        @server.on_message
        def fragile(session: Session, envelope: Envelope, message: Message) -> None:
            def commit() -> None:
                raise OSError("the archive went away")

            message.stage(commit, lambda: aborted.append(message.id), name="fragile")

        async with server:
            return (await send(server.address[1], "a@example.org", ["b@example.com"]))[0]

    assert asyncio.run(main()) == 451
    assert aborted == []  # committing, not aborting: the Maildir kept its copy
    assert len(maildir_messages(maildir)) == 1


def _maildir_server(tmp_path: Path, certs: Certs, maildir: Path) -> Server:
    return Server(
        hostname="front.test",
        listen="127.0.0.1:0",
        state_dir=tmp_path / "state",
        tls_cert=certs.cert,
        tls_key=certs.key,
        maildir=maildir,
    )


def test_a_header_added_after_the_maildir_step_is_not_in_its_copy(
    tmp_path: Path, certs: Certs
) -> None:
    """The Maildir delivery links the spool at commit time; a later step that rewrites
    the spool (a new file, the old one removed) makes it keep its own version first."""
    maildir = tmp_path / "M"
    later_paths: list[Path | None] = []

    async def main() -> int:
        server = _maildir_server(tmp_path, certs, maildir)

        @server.on_message(after="maildir")
        async def stamp(session: Session, envelope: Envelope, message: Message) -> None:
            await message.prepend_header("X-Later", "added after the Maildir step")
            await message.prepend_header("X-Later-2", "and again")
            later_paths.append(message.path)

        async with server:
            return (await send(server.address[1], "a@example.org", ["b@example.com"]))[0]

    assert asyncio.run(main()) == 250
    (stored,) = maildir_messages(maildir)
    assert b"X-Later" not in stored
    assert b"Subject:" in stored
    assert later_paths and later_paths[0] is not None
    assert _files(maildir / "tmp") == []  # the pinned copy and both spools are gone


def test_a_header_added_before_the_maildir_step_is_in_its_copy(
    tmp_path: Path, certs: Certs
) -> None:
    maildir = tmp_path / "M"

    async def main() -> int:
        server = _maildir_server(tmp_path, certs, maildir)

        @server.on_message(before="maildir")
        async def stamp(session: Session, envelope: Envelope, message: Message) -> None:
            await message.prepend_header("X-Earlier", "added before the Maildir step")

        async with server:
            return (await send(server.address[1], "a@example.org", ["b@example.com"]))[0]

    assert asyncio.run(main()) == 250
    (stored,) = maildir_messages(maildir)
    assert stored.startswith(b"X-Earlier: added before the Maildir step\r\n")
    assert _files(maildir / "tmp") == []


def test_a_refusal_after_a_rewrite_drops_the_pinned_copy(tmp_path: Path, certs: Certs) -> None:
    maildir = tmp_path / "M"

    async def main() -> int:
        server = _maildir_server(tmp_path, certs, maildir)

        @server.on_message(after="maildir")
        async def stamp_then_refuse(session: Session, envelope: Envelope, message: Message) -> None:
            await message.prepend_header("X-Later", "x")
            raise Reject(550, "changed my mind")

        async with server:
            return (await send(server.address[1], "a@example.org", ["b@example.com"]))[0]

    assert asyncio.run(main()) == 550
    assert maildir_messages(maildir) == []
    assert _files(maildir / "tmp") == []


def test_the_commit_process_ends_with_the_server(tmp_path: Path, certs: Certs) -> None:
    """The Maildir's helper process (its commits and spool files) serves the server's
    messages and ends when the server closes, after answering what it was sent."""
    from mailgate.delivery.hooks import MaildirDelivery

    maildir = tmp_path / "M"
    pids: list[int | None] = []

    async def main() -> list[int]:
        server = _maildir_server(tmp_path, certs, maildir)
        async with server:
            (delivery,) = [p for p in server.hooks.plugins() if isinstance(p, MaildirDelivery)]
            port = server.address[1]
            codes = await asyncio.gather(
                *(send(port, f"a{i}@example.org", ["b@example.com"]) for i in range(8))
            )
            pids.append(delivery.committer.pid)
            assert delivery.committer.committed == 8
        pids.append(delivery.committer.pid)
        return [code for code, _ in codes]

    assert asyncio.run(main()) == [250] * 8
    assert len(maildir_messages(maildir)) == 8
    assert pids[0] is not None and pids[1] is None
    with pytest.raises(ProcessLookupError):  # ended and reaped
        os.kill(pids[0], 0)
    assert _files(maildir / "tmp") == []  # the spool files it made ahead are removed too


@pytest.mark.parametrize("same", [False, True], ids=["other-maildir", "same-maildir"])
def test_a_background_maildir_delivers_its_own_copy_after_the_250(
    tmp_path: Path, certs: Certs, monkeypatch: pytest.MonkeyPatch, same: bool
) -> None:
    """A Maildir step marked ``required = False`` gets the message after the reply, on a
    copy without a spool of its own to sync: in the spool's Maildir it is linked and
    fsynced by its path (by the commit process, asked without the "already synced"
    flag), elsewhere copied into a durable file."""
    from mailgate.delivery import hooks as delivery_hooks
    from mailgate.delivery.commit_process import ProcessCommitter
    from mailgate.delivery.hooks import MaildirDelivery

    maildir = tmp_path / "M"
    archive = maildir if same else tmp_path / "Archive"
    synced_by_path: list[str] = []
    real_fsync_file = delivery_hooks.fsync_file

    def recording(path: Path) -> None:
        synced_by_path.append(path.name)
        real_fsync_file(path)

    monkeypatch.setattr(delivery_hooks, "fsync_file", recording)
    real_request = ProcessCommitter._request

    def request(self: ProcessCommitter, loop: Any, source: Path, **flags: bool) -> Any:
        if not flags["synced"]:
            synced_by_path.append(source.name)
        return real_request(self, loop, source, **flags)

    monkeypatch.setattr(ProcessCommitter, "_request", request)

    async def main() -> int:
        server = _maildir_server(tmp_path, certs, maildir)
        later = MaildirDelivery(archive)
        later.name = "archive"
        later.required = False  # type: ignore[attr-defined]
        server.add_plugin(later)
        async with server:
            code = (await send(server.address[1], "a@example.org", ["b@example.com"]))[0]
            for _ in range(100):  # bounded: 5 s
                if len(maildir_messages(archive)) == (2 if same else 1):
                    break
                await asyncio.sleep(0.05)
        return code

    assert asyncio.run(main()) == 250
    stored = maildir_messages(maildir)
    if same:
        assert len(stored) == 2 and stored[0] == stored[1]
        assert not any(name.endswith(".later") for name in os.listdir(maildir / "new"))
        # The server's spool is fsynced by its path in the commit process too.
        assert len(synced_by_path) == 2 and synced_by_path[1].endswith(".later")
    else:
        assert len(stored) == 1
        assert maildir_messages(archive) == stored
        # The archive's copy is a file of its own, fsynced as made: never by its path.
        assert not any(name.endswith(".later") for name in synced_by_path)
    assert _files(archive / "tmp") == []
    assert _files(maildir / "tmp") == []
