import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.delivery import mbox as mbox_module
from mailgate.delivery.mbox import MboxLockError, MboxrdEncoder, MboxStore, from_line
from mailgate.server.spool import SpoolFile, write_all

WHEN = 1_700_000_000.0  # Tue Nov 14 22:13:20 2023 UTC
STAMP = "Tue Nov 14 22:13:20 2023"


def spooled(directory: Path, data: bytes) -> SpoolFile:
    spool = SpoolFile(directory)
    spool.write(data)
    spool.finish()
    return spool


def reference(message: bytes) -> bytes:
    """mboxrd of a whole message at once, the obvious way."""
    text = message.replace(b"\r\n", b"\n")
    text = re.sub(rb"(?m)^(>*From )", rb">\1", text)
    if text and not text.endswith(b"\n"):
        text += b"\n"
    return text + b"\n"


def encode(message: bytes, block: int) -> bytes:
    encoder = MboxrdEncoder()
    out = [encoder.feed(message[i : i + block]) for i in range(0, len(message), block)]
    return b"".join(out) + encoder.close()


def test_two_messages_appended(tmp_path: Path) -> None:
    path = tmp_path / "inbox"
    store = MboxStore(path)
    store.deliver_spooled(
        spooled(tmp_path, b"Subject: one\r\n\r\nfirst\r\n"),
        sender="a@example.org",
        received_at=WHEN,
    )
    store.deliver_spooled(
        spooled(tmp_path, b"Subject: two\r\n\r\nsecond"), sender=None, received_at=WHEN
    )
    assert (
        path.read_bytes()
        == (
            f"From a@example.org {STAMP}\nSubject: one\n\nfirst\n\n"
            f"From MAILER-DAEMON {STAMP}\nSubject: two\n\nsecond\n\n"
        ).encode()
    )
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert not store.lock_path.exists()


def test_plain_path_source(tmp_path: Path) -> None:
    source = tmp_path / "msg"
    source.write_bytes(b"x\r\n")
    store = MboxStore(tmp_path / "inbox")
    store.deliver_spooled(source, sender="<b@example.org>", received_at=WHEN)
    assert store.path.read_bytes() == f"From b@example.org {STAMP}\nx\n\n".encode()


def test_from_line_sender_forms() -> None:
    assert from_line("", WHEN) == f"From MAILER-DAEMON {STAMP}\n".encode()
    assert from_line("<>", WHEN) == f"From MAILER-DAEMON {STAMP}\n".encode()
    assert from_line('"a b"@x\r\n', WHEN) == f'From "a_b"@x {STAMP}\n'.encode()
    assert from_line("jörg@x", WHEN) == f"From jörg@x {STAMP}\n".encode()


def test_from_quoting() -> None:
    message = (
        b"From: header is not a From_ line\r\n\r\n"
        b"From the start\r\n>From once\r\n>>From twice\r\n"
        b" From indented\r\nFromage\r\n>> no From\r\nFrom"
    )
    assert encode(message, 1 << 16) == (
        b"From: header is not a From_ line\n\n"
        b">From the start\n>>From once\n>>>From twice\n"
        b" From indented\nFromage\n>> no From\nFrom\n\n"
    )


@pytest.mark.parametrize("block", range(1, 14))
def test_block_boundaries_do_not_change_output(block: int) -> None:
    message = (
        b"From a\r\n>>>From b\r\nFro\r\nFrom\r\n\r\rFrom c\r\r\nx From\r\n>>>\r\n>From "
        b"\r\n\r\n\r\nFrom  \r\n>F\r\n>>>>>>>>>>>>>>>>>>>>>>From z"
    )
    assert encode(message, block) == reference(message)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"From ", b">", b"F", b"rom", b" ", b"\r", b"\n", b"\r\n", b"x"])),
    st.integers(min_value=1, max_value=9),
)
def test_encoder_matches_reference(parts: list[bytes], block: int) -> None:
    message = b"".join(parts)
    assert encode(message, block) == reference(message)


def test_tiny_store_blocks_stream_correctly(tmp_path: Path) -> None:
    body = b"".join(b"%sFrom line %d\r\n" % (b">" * (i % 4), i) for i in range(500))
    store = MboxStore(tmp_path / "inbox", block_size=3)
    store.deliver_spooled(spooled(tmp_path, body), sender="s@x", received_at=WHEN)
    assert store.path.read_bytes() == f"From s@x {STAMP}\n".encode() + reference(body)


def test_existing_mbox_without_final_blank_line(tmp_path: Path) -> None:
    path = tmp_path / "inbox"
    path.write_bytes(b"From x Mon Jan  1 00:00:00 2001\nold")
    MboxStore(path).deliver_spooled(spooled(tmp_path, b"new\r\n"), sender="s@x", received_at=WHEN)
    assert path.read_bytes() == (
        f"From x Mon Jan  1 00:00:00 2001\nold\n\nFrom s@x {STAMP}\nnew\n\n".encode()
    )


def test_file_and_new_directory_are_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    spool = spooled(tmp_path, b"m\r\n")
    monkeypatch.setattr(os, "fsync", fsync)
    store = MboxStore(tmp_path / "inbox")
    store.deliver_spooled(spool, sender=None)
    mbox, directory = os.path.realpath(store.path), os.path.realpath(tmp_path)
    assert synced == [mbox, directory]
    synced.clear()
    store.deliver_spooled(spool, sender=None)
    assert synced == [mbox]  # existing file: its directory entry is already durable


def test_fresh_dotlock_of_another_program_times_out(tmp_path: Path) -> None:
    store = MboxStore(tmp_path / "inbox", lock_timeout=0.2)
    store.path.write_bytes(b"")
    store.lock_path.write_bytes(b"12345\n")
    started = time.monotonic()
    with pytest.raises(MboxLockError, match=r"still locked after 0\.2 s"):
        store.deliver_spooled(spooled(tmp_path, b"m"), sender=None)
    assert time.monotonic() - started >= 0.2
    assert store.lock_path.read_bytes() == b"12345\n"  # not ours to remove
    assert store.path.read_bytes() == b""


def test_stale_dotlock_is_removed(tmp_path: Path) -> None:
    store = MboxStore(tmp_path / "inbox", lock_timeout=0.2, stale_lock_after=300)
    store.lock_path.write_bytes(b"12345\n")
    old = time.time() - 301
    os.utime(store.lock_path, (old, old))
    store.deliver_spooled(spooled(tmp_path, b"m"), sender=None, received_at=WHEN)
    assert store.path.read_bytes() == f"From MAILER-DAEMON {STAMP}\nm\n\n".encode()
    assert not store.lock_path.exists()


def test_thread_holding_the_lock_makes_others_wait(tmp_path: Path) -> None:
    store = MboxStore(tmp_path / "inbox", lock_timeout=0.1)
    waiting = MboxStore(tmp_path / "inbox", lock_timeout=30)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with store.locked():
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        with pytest.raises(MboxLockError):
            store.deliver_spooled(spooled(tmp_path, b"m"), sender=None)
        errors: list[BaseException] = []

        def deliver() -> None:
            try:
                waiting.deliver_spooled(spooled(tmp_path, b"late"), sender=None, received_at=WHEN)
            except BaseException as exc:
                errors.append(exc)

        second = threading.Thread(target=deliver)
        second.start()
        second.join(0.2)
        assert second.is_alive()  # still waiting for the lock
        assert store.path.stat().st_size == 0  # stat: opening would drop the fcntl lock
    finally:
        release.set()
        thread.join(10)
    second.join(10)
    assert errors == []
    assert store.path.read_bytes() == f"From MAILER-DAEMON {STAMP}\nlate\n\n".encode()


HOLD_FCNTL_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_fcntl_lock_of_another_process_is_respected(tmp_path: Path) -> None:
    store = MboxStore(tmp_path / "inbox", lock_timeout=0.2)
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_FCNTL_LOCK, str(store.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "locked\n"
        with pytest.raises(MboxLockError, match="fcntl"):
            store.deliver_spooled(spooled(tmp_path, b"m"), sender=None)
        assert not store.lock_path.exists()  # our dotlock was released on the way out
        assert store.path.read_bytes() == b""
    finally:
        child.communicate(timeout=10)
    store.deliver_spooled(spooled(tmp_path, b"m"), sender=None, received_at=WHEN)
    assert store.path.read_bytes() == f"From MAILER-DAEMON {STAMP}\nm\n\n".encode()


def test_failure_part_way_truncates_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "inbox"
    store = MboxStore(path, block_size=8)
    store.deliver_spooled(spooled(tmp_path, b"first\r\n"), sender=None, received_at=WHEN)
    before = path.read_bytes()
    real_write_all = write_all
    calls = 0

    def failing_write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            real_write_all(fd, bytes(data)[:3])  # a short write, then the disk is full
            raise OSError(28, "No space left on device")
        real_write_all(fd, data)

    monkeypatch.setattr(mbox_module, "write_all", failing_write_all)
    with pytest.raises(OSError, match="No space"):
        store.deliver_spooled(spooled(tmp_path, b"x" * 100), sender=None, received_at=WHEN)
    assert calls == 3
    assert path.read_bytes() == before
    assert not store.lock_path.exists()
    monkeypatch.setattr(mbox_module, "write_all", real_write_all)
    store.deliver_spooled(spooled(tmp_path, b"second"), sender=None, received_at=WHEN)
    assert path.read_bytes() == before + f"From MAILER-DAEMON {STAMP}\nsecond\n\n".encode()


class FailingReader:
    """Gives two blocks of a message, then fails like a disk read error."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self, size: int) -> bytes:
        self.reads += 1
        if self.reads > 2:
            raise OSError(5, "Input/output error")
        return b"y" * size

    def __enter__(self) -> "FailingReader":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_failing_reader_truncates_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "inbox"
    original = b"From x Mon Jan  1 00:00:00 2001\nold\n\n"
    path.write_bytes(original)
    store = MboxStore(path, block_size=4)
    spool = spooled(tmp_path, b"unused")
    reader = FailingReader()
    monkeypatch.setattr(spool, "open_for_reading", lambda: reader)
    with pytest.raises(OSError, match="Input/output"):
        store.deliver_spooled(spool, sender=None)
    assert reader.reads == 3
    assert path.read_bytes() == original
    assert not store.lock_path.exists()
