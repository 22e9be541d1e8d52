import errno
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from mailgate.delivery.maildir import MaildirStore
from mailgate.server.spool import SpoolFile

MESSAGE = b"Subject: hi\r\n\r\nbody line\r\n.dot\r\n"


class Events:
    """Records fsync (by path), link and rename calls in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    def index(self, event: tuple[str, str]) -> int:
        return self.log.index(event)


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Events:
    recorded = Events()
    real_fsync, real_link, real_rename = os.fsync, os.link, os.rename

    def fsync(fd: int) -> None:
        recorded.log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def link(src: os.PathLike[str] | str, dst: os.PathLike[str] | str) -> None:
        real_link(src, dst)
        recorded.log.append(("link", os.path.realpath(dst)))

    def rename(src: os.PathLike[str] | str, dst: os.PathLike[str] | str) -> None:
        real_rename(src, dst)
        recorded.log.append(("rename", os.path.realpath(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "rename", rename)
    return recorded


def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def real(path: Path) -> str:
    return os.path.realpath(path)


def test_creates_maildir_private_and_synced(tmp_path: Path, events: Events) -> None:
    root = tmp_path / "deep" / "Maildir"
    store = MaildirStore(root)
    for sub in ("tmp", "new", "cur"):
        assert stat.S_IMODE((root / sub).stat().st_mode) & 0o077 == 0
    assert store.tmp_dir == root / "tmp"
    assert ("fsync", real(root)) in events.log
    assert ("fsync", real(root.parent)) in events.log
    events.log.clear()
    MaildirStore(root)  # already there: nothing to make durable
    assert events.log == []


def test_create_false_requires_an_existing_maildir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        MaildirStore(tmp_path / "missing", create=False)
    MaildirStore(tmp_path / "m")
    assert MaildirStore(tmp_path / "m", create=False).root == tmp_path / "m"


def test_spool_in_tmp_is_linked_durably(tmp_path: Path, events: Events) -> None:
    store = MaildirStore(tmp_path / "Maildir")
    spool = SpoolFile(store.tmp_dir)
    spool.write(MESSAGE)
    spool.finish()
    inode = spool.path.stat().st_ino
    events.log.clear()

    key = store.deliver_spooled(spool)

    delivered = store.root / "new" / key
    assert key == spool.path.name
    assert delivered.read_bytes() == MESSAGE
    assert delivered.stat().st_ino == inode  # no copy
    assert delivered.stat().st_nlink == 1
    assert list(store.tmp_dir.iterdir()) == []
    assert events.log == [("link", real(delivered)), ("fsync", real(store.root / "new"))]
    spool.discard()  # no-op now, must not touch the delivered message
    assert delivered.read_bytes() == MESSAGE


def test_deliver_bytes_orders_file_sync_link_dir_sync(tmp_path: Path, events: Events) -> None:
    store = MaildirStore(tmp_path / "Maildir")
    events.log.clear()

    key = store.deliver_bytes(MESSAGE)

    delivered = store.root / "new" / key
    assert delivered.read_bytes() == MESSAGE
    assert list(store.tmp_dir.iterdir()) == []
    file_sync = events.log[0]
    assert file_sync[0] == "fsync"
    assert Path(file_sync[1]).parent == Path(real(store.tmp_dir))
    assert Path(file_sync[1]).name == key
    assert events.log[1:] == [("link", real(delivered)), ("fsync", real(store.root / "new"))]
    assert stat.S_IMODE(delivered.stat().st_mode) == 0o600


def test_spool_elsewhere_is_copied(tmp_path: Path, events: Events) -> None:
    store = MaildirStore(tmp_path / "Maildir")
    outside = tmp_path / "spool"
    outside.mkdir()
    spool = SpoolFile(outside)
    body = os.urandom(3 * 1024 * 1024 + 17)
    spool.write(body)
    spool.finish()
    events.log.clear()

    key = store.deliver_spooled(spool)

    delivered = store.root / "new" / key
    assert delivered.read_bytes() == body
    assert delivered.stat().st_ino != spool.path.stat().st_ino
    assert spool.path.read_bytes() == body  # the caller's spool is left alone
    assert list(store.tmp_dir.iterdir()) == []
    copy_sync, link, dir_sync = events.log
    assert copy_sync[0] == "fsync" and Path(copy_sync[1]).parent == Path(real(store.tmp_dir))
    assert link == ("link", real(delivered))
    assert dir_sync == ("fsync", real(store.root / "new"))
    spool.discard()


def test_plain_path_is_synced_before_linking(tmp_path: Path, events: Events) -> None:
    store = MaildirStore(tmp_path / "Maildir")
    path = store.tmp_dir / "1700000000.M1P1Q1Rab.host"
    path.write_bytes(MESSAGE)
    events.log.clear()

    key = store.deliver_spooled(path)

    assert key == path.name
    assert not path.exists()
    assert events.log == [
        ("fsync", real(path.parent) + "/" + path.name),
        ("link", real(store.root / "new" / key)),
        ("fsync", real(store.root / "new")),
    ]


def test_unfinished_spool_is_refused(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "Maildir")
    spool = SpoolFile(store.tmp_dir)
    spool.write(MESSAGE)
    with pytest.raises(ValueError, match="finished"):
        store.deliver_spooled(spool)
    assert list((store.root / "new").iterdir()) == []
    spool.discard()


def test_name_taken_in_new_picks_another(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "Maildir")
    spool = SpoolFile(store.tmp_dir)
    spool.write(MESSAGE)
    spool.finish()
    squatter = store.root / "new" / spool.path.name
    squatter.write_bytes(b"someone else")

    key = store.deliver_spooled(spool)

    assert key != spool.path.name
    assert squatter.read_bytes() == b"someone else"
    assert (store.root / "new" / key).read_bytes() == MESSAGE
    assert list(store.tmp_dir.iterdir()) == []


def test_filesystem_without_hard_links_falls_back_to_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MaildirStore(tmp_path / "Maildir")

    def no_link(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    key = store.deliver_bytes(MESSAGE)
    assert (store.root / "new" / key).read_bytes() == MESSAGE
    assert list(store.tmp_dir.iterdir()) == []


def test_other_link_errors_propagate_and_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MaildirStore(tmp_path / "Maildir")

    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", full)
    with pytest.raises(OSError, match="No space"):
        store.deliver_bytes(MESSAGE)
    assert list(store.tmp_dir.iterdir()) == []
    assert list((store.root / "new").iterdir()) == []


def test_ten_thousand_deliveries_get_unique_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_fsync(monkeypatch)  # durability is tested above; this is about names
    store = MaildirStore(tmp_path / "Maildir")
    keys = [store.deliver_bytes(b"%d" % i) for i in range(10_000)]
    assert len(set(keys)) == 10_000
    assert len(os.listdir(store.root / "new")) == 10_000
    assert os.listdir(store.tmp_dir) == []


def _deliver_many(root: str, tag: str, count: int) -> None:
    os.fsync = lambda fd: None  # only names matter here; this is a throwaway process
    store = MaildirStore(Path(root), create=False)
    for i in range(count):
        store.deliver_bytes(f"{tag}-{i}".encode())


def test_two_processes_never_collide(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "Maildir")
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_deliver_many, args=(str(store.root), tag, 2000)) for tag in "ab"
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        if worker.is_alive():
            worker.kill()
        assert worker.exitcode == 0
    new = store.root / "new"
    contents = {(new / name).read_bytes() for name in os.listdir(new)}
    expected = {f"{tag}-{i}".encode() for tag in "ab" for i in range(2000)}
    assert contents == expected
    pids = {name.split("P", 1)[1].split("Q", 1)[0] for name in os.listdir(new)}
    assert len(pids) == 2


def test_group_sync_covers_every_change_with_fewer_fsyncs(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import threading
    import time

    from mailgate.delivery import maildir as md

    directory = tmp_path / "d"
    directory.mkdir()
    group = md._GroupSync(directory)
    lock = threading.Lock()
    changes = 0
    fsync_starts: list[int] = []  # how many changes existed when each fsync began

    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        with lock:
            fsync_starts.append(changes)
        time.sleep(0.005)
        real_fsync(fd)

    monkeypatch.setattr(md.os, "fsync", slow_fsync)
    failures: list[str] = []

    def worker() -> None:
        nonlocal changes
        for _ in range(20):
            with lock:
                changes += 1
                mine = changes
            group.sync()
            with lock:
                if not any(started >= mine for started in fsync_starts):
                    failures.append(f"change {mine} returned before an fsync covering it")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    group.close()
    assert not failures
    assert changes == 160
    assert len(fsync_starts) < 160  # concurrent callers shared fsyncs


# --- GroupCommitter: the server's batched durable delivery ----------------------------------


def spools(store: MaildirStore, count: int) -> list[SpoolFile]:
    made = []
    for i in range(count):
        spool = SpoolFile(store.tmp_dir)
        spool.write(b"message %d\r\n" % i)
        spool.flush()
        made.append(spool)
    return made


def test_committer_answers_only_after_file_link_and_directory_are_durable(
    tmp_path: Path, events: Events
) -> None:
    import asyncio

    from mailgate.delivery.maildir import GroupCommitter

    store = MaildirStore(tmp_path / "M")
    committer = GroupCommitter(store, threads=2)
    made = spools(store, 40)

    async def main() -> list[str]:
        futures = []
        for spool in made:
            future = committer.submit(spool.path, sync=spool.finish, keep_source=True)
            future.add_done_callback(
                lambda f: events.log.append(("answered", real(store.new_dir / f.result())))
            )
            futures.append(future)
        return list(await asyncio.gather(*futures))

    names = asyncio.run(main())
    committer.close()
    new_dir = real(store.new_dir)
    assert len(set(names)) == 40
    for spool, name in zip(made, names, strict=True):
        target = real(store.new_dir / name)
        assert (store.new_dir / name).read_bytes() == spool.path.read_bytes()
        synced = events.index(("fsync", real(spool.path)))
        linked = events.index(("link", target))
        answered = events.index(("answered", target))
        assert synced < linked < answered
        # An fsync of new/ that began after the link and before the answer.
        assert any(event == ("fsync", new_dir) for event in events.log[linked + 1 : answered]), (
            f"{name}: answered without an fsync of new/ after its link"
        )
    dir_syncs = events.log.count(("fsync", new_dir))
    assert dir_syncs <= committer.batches
    assert committer.committed == 40
    for spool in made:
        spool.discard()
    assert sorted(os.listdir(store.tmp_dir)) == []


def test_committer_groups_waiting_messages_under_one_directory_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a slow fsync runs, messages pile up and the next batch takes them all."""
    import asyncio
    import time

    from mailgate.delivery import maildir as md

    store = MaildirStore(tmp_path / "M")
    committer = md.GroupCommitter(store, threads=1)
    real_fsync = os.fsync
    dir_fsyncs = 0

    def slow_fsync(fd: int) -> None:
        nonlocal dir_fsyncs
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            dir_fsyncs += 1
        time.sleep(0.01)
        real_fsync(fd)

    monkeypatch.setattr(md.os, "fsync", slow_fsync)
    made = spools(store, 30)

    async def main() -> list[str]:
        futures = []
        for spool in made:
            futures.append(committer.submit(spool.path, synced=True))
            await asyncio.sleep(0.002)  # arrivals spread out, as from clients
        return list(await asyncio.gather(*futures))

    names = asyncio.run(main())
    committer.close()
    assert len(os.listdir(store.new_dir)) == 30 == len(set(names))
    assert committer.batches < 15, "messages waiting together should share one commit"
    assert dir_fsyncs == committer.batches
    assert os.listdir(store.tmp_dir) == []  # keep_source=False: the tmp names are gone


def test_committer_failure_of_one_file_does_not_fail_the_batch(tmp_path: Path) -> None:
    import asyncio

    from mailgate.delivery.maildir import GroupCommitter

    store = MaildirStore(tmp_path / "M")
    committer = GroupCommitter(store, threads=1)
    good = spools(store, 3)

    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def main() -> list[object]:
        futures = [committer.submit(spool.path, sync=spool.finish) for spool in good[:2]]
        futures.insert(1, committer.submit(good[2].path, sync=full))
        return list(await asyncio.gather(*futures, return_exceptions=True))

    first, failed, last = asyncio.run(main())
    committer.close()
    assert isinstance(failed, OSError) and failed.errno == errno.ENOSPC
    assert sorted(os.listdir(store.new_dir)) == sorted([first, last])
    assert os.listdir(store.tmp_dir) == [good[2].path.name]  # its owner removes it


def test_committer_directory_fsync_failure_fails_the_batch_and_unlinks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from mailgate.delivery import maildir as md

    store = MaildirStore(tmp_path / "M")
    committer = md.GroupCommitter(store, threads=1)
    made = spools(store, 3)
    real_fsync = os.fsync

    def failing(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(md.os, "fsync", failing)

    async def main() -> list[object]:
        futures = [committer.submit(s.path, sync=s.finish, keep_source=True) for s in made]
        return list(await asyncio.gather(*futures, return_exceptions=True))

    results = asyncio.run(main())
    committer.close()
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results)
    # Not durable, so not delivered: nothing stays in new/ for a retry to duplicate.
    assert os.listdir(store.new_dir) == []


def test_committer_copies_a_file_from_elsewhere_and_skips_cancelled_messages(
    tmp_path: Path,
) -> None:
    import asyncio

    from mailgate.delivery.maildir import GroupCommitter

    store = MaildirStore(tmp_path / "M")
    committer = GroupCommitter(store, threads=1)
    outside = tmp_path / "outside.eml"
    outside.write_bytes(MESSAGE)
    (gone,) = spools(store, 1)

    async def main() -> str:
        cancelled = committer.submit(gone.path, synced=True)
        cancelled.cancel()  # the client left before its turn: no delivery
        return await committer.submit(outside)

    name = asyncio.run(main())
    committer.close()
    assert os.listdir(store.new_dir) == [name]
    assert (store.new_dir / name).read_bytes() == MESSAGE
    assert outside.read_bytes() == MESSAGE  # left in place
    assert os.listdir(store.tmp_dir) == [gone.path.name]


def test_committer_restarts_after_close_and_in_a_forked_child(tmp_path: Path) -> None:
    import asyncio

    from mailgate.delivery.maildir import GroupCommitter

    store = MaildirStore(tmp_path / "M")
    committer = GroupCommitter(store, threads=2)

    def one(tag: bytes) -> None:
        spool = SpoolFile(store.tmp_dir)
        spool.write(tag)
        spool.finish()

        async def main() -> str:
            return await committer.submit(spool.path, synced=True)

        asyncio.run(main())

    one(b"first")
    committer.close()
    one(b"after close")
    pid = os.fork()
    if pid == 0:  # the child: its own threads, not the parent's
        try:
            one(b"in the child")
            committer.close(5)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    committer.close()
    contents = sorted((store.new_dir / name).read_bytes() for name in os.listdir(store.new_dir))
    assert contents == [b"after close", b"first", b"in the child"]
