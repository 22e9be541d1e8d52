import os
import re
import socket
import stat
import threading
from pathlib import Path

import pytest

from mailgate.server import spool as spool_module
from mailgate.server.spool import SpoolFile, unique_name

NAME = re.compile(r"(\d+)\.M(\d+)P(\d+)Q(\d+)R([0-9a-f]{16})\.(.+)")


def test_many_chunks_read_back_exactly(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path)
    chunks = [bytes([i % 251]) * (i * 37 % 5000) for i in range(2000)]
    chunks.append(os.urandom(1024 * 1024))  # larger than the buffer: written directly
    chunks.append(b"tail\r\n")
    for chunk in chunks:
        spool.write(chunk)
    expected = b"".join(chunks)
    assert spool.size == len(expected)
    spool.finish()
    assert spool.finished
    with spool.open_for_reading() as reader:
        assert reader.read() == expected
    assert spool.path.read_bytes() == expected


def test_size_counts_bytes_of_any_buffer(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path)
    spool.write(b"abc")
    spool.write(bytearray(b"de"))
    spool.write(memoryview(b"\x00" * 8).cast("I"))  # 2 items, 8 bytes
    spool.write(b"")
    assert spool.size == 13
    spool.finish()
    assert spool.path.stat().st_size == 13


def test_created_private_and_named_like_maildir(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path)
    assert spool.path.parent == tmp_path
    assert stat.S_IMODE(spool.path.stat().st_mode) == 0o600
    match = NAME.fullmatch(spool.path.name)
    assert match is not None
    assert int(match[3]) == os.getpid()
    spool.discard()


def test_missing_directory_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        SpoolFile(tmp_path / "nope")


def test_finish_fsyncs_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    spool = SpoolFile(tmp_path)
    spool.write(b"x" * 10)
    assert synced == []
    spool.finish()
    assert synced == [os.path.realpath(spool.path)]
    spool.finish()  # idempotent, no second sync
    assert synced == [os.path.realpath(spool.path)]


def test_discard_removes_and_is_idempotent(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path)
    spool.write(b"data" * 1000)
    spool.discard()
    assert not spool.path.exists()
    assert list(tmp_path.iterdir()) == []
    spool.discard()
    with pytest.raises(ValueError):
        spool.write(b"more")
    with pytest.raises(ValueError):
        spool.finish()
    with pytest.raises(ValueError):
        spool.open_for_reading()


def test_discard_after_finish_and_after_the_name_is_gone(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path)
    spool.write(b"data")
    spool.finish()
    with pytest.raises(ValueError):
        spool.write(b"late")
    os.rename(spool.path, tmp_path / "moved")  # what a Maildir delivery does
    spool.discard()
    assert (tmp_path / "moved").read_bytes() == b"data"


def test_reading_before_finish_sees_everything_written(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path)
    spool.write(b"partial ")
    with spool.open_for_reading() as reader:
        assert reader.read() == b"partial "
    spool.write(b"message")
    spool.finish()
    with spool.open_for_reading() as reader:
        assert reader.read() == b"partial message"
    spool.discard()


def test_unique_name_escapes_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "_hostname", None)
    monkeypatch.setattr(socket, "gethostname", lambda: "host/a:b")
    name = unique_name(1700000000.25)
    match = NAME.fullmatch(name)
    assert match is not None
    assert match[1] == "1700000000"
    assert match[2] == "250000"
    assert match[6] == r"host\057a\072b"
    assert "/" not in name and ":" not in name


def test_unique_names_across_threads() -> None:
    names: list[list[str]] = [[] for _ in range(8)]

    def make(out: list[str]) -> None:
        out.extend(unique_name(1700000000.0) for _ in range(2000))

    threads = [threading.Thread(target=make, args=(out,)) for out in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    flat = [name for out in names for name in out]
    assert len(set(flat)) == len(flat) == 16000


# --- the pool of spool files made ahead ----------------------------------------------------


def test_the_pool_hands_out_files_made_ahead_in_one_thread_hop(tmp_path: Path) -> None:
    import asyncio

    from mailgate.server.spool import SpoolPool

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pool = SpoolPool(tmp_path, size=4)
        assert pool.take(loop) is None  # empty at first: the caller makes its own
        for _ in range(100):
            if len(pool) == 4:
                break
            await asyncio.sleep(0.01)
        assert len(pool) == 4 and len(list(tmp_path.iterdir())) == 4
        taken = [pool.take(loop) for _ in range(2)]
        assert all(isinstance(spool, SpoolFile) for spool in taken)
        assert len({spool.path for spool in taken if spool is not None}) == 2
        # Half used: a refill of two more was started.
        for _ in range(100):
            if len(pool) == 4:
                break
            await asyncio.sleep(0.01)
        assert len(pool) == 4
        spool = taken[0]
        assert spool is not None
        spool.write(b"Subject: pooled\r\n\r\nbody\r\n")
        spool.finish()
        assert spool.path.read_bytes() == b"Subject: pooled\r\n\r\nbody\r\n"
        await pool.aclose()
        # Only the two handed out are left.
        assert sorted(tmp_path.iterdir()) == sorted(s.path for s in taken if s is not None)

    asyncio.run(main())


def test_old_pooled_files_are_removed_not_handed_out(tmp_path: Path) -> None:
    import asyncio

    from mailgate.server.spool import SpoolPool

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pool = SpoolPool(tmp_path, size=2, max_age=0.0)
        pool.take(loop)
        for _ in range(100):
            if len(pool) == 2:
                break
            await asyncio.sleep(0.01)
        old = {p.name for p in tmp_path.iterdir()}
        assert len(old) == 2
        await asyncio.sleep(0.01)
        assert pool.take(loop) is None  # both too old: removed, and a refill started
        assert not old & {p.name for p in tmp_path.iterdir()}
        await pool.aclose()

    asyncio.run(main())


def test_a_pool_that_cannot_make_files_stays_empty(tmp_path: Path) -> None:
    import asyncio

    from mailgate.server.spool import SpoolPool

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pool = SpoolPool(tmp_path / "missing", size=4)
        assert pool.take(loop) is None
        await asyncio.sleep(0.1)
        assert pool.take(loop) is None and len(pool) == 0
        await pool.aclose()

    asyncio.run(main())


def test_unique_names_in_a_forked_child_carry_its_pid_and_fresh_randomness() -> None:
    parent = unique_name(1700000000.0)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write_end, unique_name(1700000000.0).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as reader:
        child = reader.read().decode()
    assert status == 0
    parent_match, child_match = NAME.fullmatch(parent), NAME.fullmatch(child)
    assert parent_match is not None and child_match is not None
    assert parent_match[3] == str(os.getpid())
    assert child_match[3] == str(pid)
    assert parent_match[5] != child_match[5]  # the random part: not the parent's sequence


def test_an_outrun_pool_grows_and_a_registered_source_makes_and_removes_its_files(
    tmp_path: Path,
) -> None:
    """A pool found empty after its first batch doubles (up to max_size); a source
    registered for its directory (a Maildir's commit process) makes the files instead of
    a worker thread, and is asked to remove the names of the spools it made."""
    import asyncio

    from mailgate.server.spool import (
        SpoolPool,
        register_spool_source,
        unregister_spool_source,
    )

    class Source:
        def __init__(self) -> None:
            self.asked: list[int] = []
            self.removed: list[Path] = []

        def make_spools(
            self, loop: asyncio.AbstractEventLoop, directory: Path, count: int
        ) -> asyncio.Future[list[Path]]:
            self.asked.append(count)
            made = [directory / f"made-{len(self.asked)}-{n}" for n in range(count)]
            for path in made:
                path.touch()
            future: asyncio.Future[list[Path]] = loop.create_future()
            loop.call_soon(future.set_result, made)
            return future

        def remove_spool(self, path: Path) -> bool:
            self.removed.append(path)
            path.unlink()
            return True

    async def fill(pool: SpoolPool, count: int) -> None:
        for _ in range(100):
            if len(pool) >= count and not pool.refilling:
                return
            await asyncio.sleep(0.01)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        source = Source()
        register_spool_source(tmp_path, source)
        try:
            pool = SpoolPool(tmp_path, size=2, max_size=8)
            assert pool.take(loop) is None and pool.size == 2  # the first miss is no outrun
            await fill(pool, 2)
            taken = [pool.take(loop) for _ in range(3)]  # the third finds it empty
            assert taken[2] is None and pool.size == 4
            await fill(pool, 1)  # the refill asked for before it grew
            taken.append(pool.take(loop))  # ... is taken: a refill up to the new size
            await fill(pool, 4)
            assert source.asked == [2, 1, 4] and len(pool) == 4
            spool = taken[0]
            assert spool is not None and spool.path.name.startswith("made-")
            spool.write(b"x")
            spool.discard()
            assert source.removed == [spool.path]
            for _ in range(6):
                pool.take(loop)
                await fill(pool, 1)
            assert pool.size <= 8
            await pool.aclose()
        finally:
            unregister_spool_source(tmp_path, source)

    asyncio.run(main())
