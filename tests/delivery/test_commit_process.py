"""The Maildir commit process (delivery/_maildir_commitd.py) and its client in the server
(delivery/commit_process.py): durable before answered, batches, failures, its end."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from mailgate.delivery import _maildir_commitd as helper
from mailgate.delivery import commit_process
from mailgate.delivery.commit_process import ProcessCommitter
from mailgate.delivery.maildir import MaildirStore
from mailgate.server.spool import SpoolFile


def _request(job: int, flags: int, path: Path | str, name: str) -> bytes:
    return b"%d\0%d\0%s\0%s\0" % (job, flags, os.fsencode(path), os.fsencode(name))


def _answers(data: bytes) -> dict[int, tuple[int, str]]:
    fields = data.split(b"\0")
    return {
        int(fields[i]): (int(fields[i + 1]), fields[i + 2].decode())
        for i in range(0, len(fields) - 1, 3)
    }


def _run_helper(store: MaildirStore, requests: bytes) -> tuple[helper.Committer, bytes]:
    """The helper's Committer in this process (so that its system calls can be watched),
    fed ``requests`` and then the end of its input; returns what it answered."""
    ours, theirs = socket.socketpair()
    committer = helper.Committer(os.fsencode(store.new_dir), theirs)
    runner = threading.Thread(target=committer.run, daemon=True)
    runner.start()
    ours.sendall(requests)
    ours.shutdown(socket.SHUT_WR)
    runner.join(10)  # it ends at the end of its input, every request answered
    assert not runner.is_alive()
    theirs.close()  # the process's exit does this
    received = b""
    ours.settimeout(10)
    while chunk := ours.recv(65536):
        received += chunk
    ours.close()
    return committer, received


def _spool(store: MaildirStore, body: bytes) -> Path:
    spool = SpoolFile(store.tmp_dir)
    spool.write(body)
    spool.flush()
    return spool.path


def test_the_helper_answers_only_after_file_link_and_directory_are_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MaildirStore(tmp_path / "M")
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        target = "" if kind == "dir" else os.readlink(f"/proc/self/fd/{fd}")
        with lock:
            events.append((f"fsync-{kind}-start", Path(target).name))
        real_fsync(fd)
        with lock:
            events.append((f"fsync-{kind}-end", Path(target).name))

    def link(source: Any, target: Any) -> None:
        real_link(source, target)
        with lock:
            events.append(("link", os.fsdecode(os.path.basename(source))))

    real_answer = helper.Committer.answer

    def answer(self: helper.Committer, answers: list[bytes]) -> None:
        with lock:
            for done in answers:
                events.append(("answer", done.split(b"\0")[0].decode()))
        real_answer(self, answers)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(helper.Committer, "answer", answer)
    sources = [_spool(store, f"message {n}\r\n".encode()) for n in range(40)]
    requests = b"".join(
        _request(n, helper._KEEP_SOURCE, source, f"new-{n}") for n, source in enumerate(sources)
    )
    _, received = _run_helper(store, requests)

    answers = _answers(received)
    assert answers == {n: (0, f"new-{n}") for n in range(40)}
    for n, source in enumerate(sources):
        assert (store.new_dir / f"new-{n}").read_bytes() == f"message {n}\r\n".encode()
        assert source.exists()  # kept: the server removes its own spool name
        synced = events.index(("fsync-file-end", source.name))
        linked = events.index(("link", source.name))
        answered = events.index(("answer", str(n)))
        assert synced < linked < answered
        # An fsync of new/ that began after the link ended before the answer.
        assert any(
            events[i] == ("fsync-dir-start", "") and ("fsync-dir-end", "") in events[i:answered]
            for i in range(linked, answered)
        ), f"message {n}: no fsync of new/ between its link and its answer"
    dir_syncs = events.count(("fsync-dir-start", ""))
    assert dir_syncs < 40, "messages waiting together should share an fsync of new/"


def test_the_helper_moves_makes_and_removes_files(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "M")
    moved = _spool(store, b"moved\r\n")
    synced = _spool(store, b"synced\r\n")
    gone = _spool(store, b"gone\r\n")
    requests = (
        _request(1, 0, moved, moved.name)
        + _request(2, helper._SYNCED, synced, synced.name)
        + _request(3, helper._CREATE, store.tmp_dir, "a/b/c")
        + _request(4, helper._REMOVE, gone, "")
        + _request(5, 0, store.tmp_dir / "missing", "missing")
    )
    _, received = _run_helper(store, requests)
    answers = _answers(received)
    assert answers[1] == (0, moved.name) and answers[2] == (0, synced.name)
    assert not moved.exists() and (store.new_dir / moved.name).read_bytes() == b"moved\r\n"
    assert answers[3] == (0, "a/b/c")
    assert all((store.tmp_dir / name).stat().st_size == 0 for name in "abc")
    assert 4 not in answers and not gone.exists()
    assert answers[5][0] == errno.ENOENT
    assert sorted(os.listdir(store.new_dir)) == sorted([moved.name, synced.name])


def test_a_failed_fsync_of_new_fails_the_batch_and_removes_its_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MaildirStore(tmp_path / "M")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "directory fsync failed")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    sources = [_spool(store, b"x\r\n") for _ in range(5)]
    requests = b"".join(
        _request(n, helper._KEEP_SOURCE, source, f"new-{n}") for n, source in enumerate(sources)
    )
    _, received = _run_helper(store, requests)
    assert {code for code, _ in _answers(received).values()} == {errno.EIO}
    assert os.listdir(store.new_dir) == []  # a retry must not find a second copy


def test_the_process_committer_makes_spools_commits_and_removes(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "M")
    committer = ProcessCommitter(store)

    async def main() -> tuple[list[str], int | None]:
        loop = asyncio.get_running_loop()
        made = committer.make_spools(loop, store.tmp_dir, 4)
        assert made is not None
        paths = await asyncio.wait_for(made, 10)
        assert len(paths) == 4 and all(p.parent == store.tmp_dir for p in paths)
        spools = [SpoolFile.existing(path, committer) for path in paths]
        for n, spool in enumerate(spools):
            spool.write(f"body {n}\r\n".encode())
            spool.flush()
        names = await asyncio.wait_for(
            asyncio.gather(*(committer.submit(s.path, keep_source=True) for s in spools)), 10
        )
        pid = committer.pid
        for spool in spools:
            spool.discard()  # the helper removes the tmp/ names
        await committer.aclose(10)
        return names, pid

    names, pid = asyncio.run(main())
    assert pid is not None and committer.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert committer.committed == 4 and not committer.unavailable
    assert sorted((store.new_dir / name).read_bytes() for name in names) == [
        f"body {n}\r\n".encode() for n in range(4)
    ]
    assert os.listdir(store.tmp_dir) == []


_SILENT_HELPER = r"""
import socket, sys
channel = socket.socket(fileno=0)
channel.recv(65536)  # one request read, never answered: then the helper dies
sys.exit(1)
"""


def test_waiters_fail_when_the_helper_dies_and_the_next_submit_starts_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MaildirStore(tmp_path / "M")
    silent = tmp_path / "silent.py"
    silent.write_text(_SILENT_HELPER)
    monkeypatch.setattr(commit_process, "_HELPER", silent)
    committer = ProcessCommitter(store)

    async def main() -> str:
        lost = committer.submit(_spool(store, b"lost\r\n"), keep_source=True)
        with pytest.raises(OSError) as failure:
            await asyncio.wait_for(lost, 10)
        assert isinstance(failure.value, commit_process.HelperEnded)
        monkeypatch.setattr(commit_process, "_HELPER", Path(helper.__file__))
        name = await asyncio.wait_for(committer.submit(_spool(store, b"kept\r\n")), 10)
        first = committer.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        for _ in range(200):  # bounded: 10 s
            if committer.pid is None and committer._channel is None:
                break
            await asyncio.sleep(0.05)
        again = await asyncio.wait_for(committer.submit(_spool(store, b"again\r\n")), 10)
        assert committer.pid not in (None, first)
        await committer.aclose(10)
        return name + "/" + again

    names = asyncio.run(main()).split("/")
    assert [(store.new_dir / name).read_bytes() for name in names] == [b"kept\r\n", b"again\r\n"]


def test_without_a_helper_the_threads_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commit_process, "_HELPER", tmp_path / "no-such-helper.py")
    store = MaildirStore(tmp_path / "M")
    committer = ProcessCommitter(store)

    async def main() -> str:
        assert committer.make_spools(asyncio.get_running_loop(), store.tmp_dir, 2) is None
        spool = SpoolFile(store.tmp_dir)
        spool.write(b"threads\r\n")
        name = await committer.submit(spool.path, sync=spool.finish)
        await committer.aclose(10)
        return name

    name = asyncio.run(main())
    assert committer.unavailable and committer.committed == 0
    assert committer.fallback.committed == 1
    assert (store.new_dir / name).read_bytes() == b"threads\r\n"


def test_a_forked_child_starts_a_helper_of_its_own(tmp_path: Path) -> None:
    """A worker forked with a running helper in its parent (``--workers``) must not
    write into its parent's socket: its first submit starts its own helper."""
    store = MaildirStore(tmp_path / "M")
    committer = ProcessCommitter(store)
    loop = asyncio.new_event_loop()

    async def one(tag: bytes) -> tuple[str, int | None]:
        name = await asyncio.wait_for(committer.submit(_spool(store, tag)), 10)
        return name, committer.pid

    try:
        _, parent_helper = loop.run_until_complete(one(b"parent"))
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:

                async def child() -> bool:
                    _, helper_pid = await one(b"child")
                    await committer.aclose(10)
                    return helper_pid not in (None, parent_helper)

                code = 0 if asyncio.run(child()) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's helper still serves the parent.
        _, again = loop.run_until_complete(one(b"parent again"))
        assert again == parent_helper
        loop.run_until_complete(committer.aclose(10))
    finally:
        loop.close()
    contents = sorted((store.new_dir / name).read_bytes() for name in os.listdir(store.new_dir))
    assert contents == [b"child", b"parent", b"parent again"]
