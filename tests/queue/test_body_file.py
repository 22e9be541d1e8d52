"""The body the runner hands the engine, for every backend: the store's own file when it
keeps bodies as files (SQLite, no copy), else a copy streamed out of the store into the
spool directory and removed after the delivery (PostgreSQL); and the copies a killed
process left behind, removed at the next start."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.queue.conftest import StoreOpener

from mailgate.queue import NewMessage, NewRecipient
from mailgate.queue.runner import body_file, remove_stale_bodies

# Larger than one stored chunk of either backend, with every byte value.
BODY = bytes(range(256)) * 5000 + b"\r\nlast line\r\n"


def test_the_body_as_a_file(open_store: StoreOpener, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()

    async def main() -> None:
        async with open_store() as store:
            message_id = await store.enqueue(
                NewMessage("alice@example.org", [NewRecipient("bob@example.net", "relay:x")]),
                BODY,
            )
            async with body_file(store, message_id, spool) as path:
                assert path.read_bytes() == BODY
                copied = list(spool.iterdir())
                if hasattr(store, "body_path"):
                    assert path == store.body_path(message_id)
                    assert copied == []
                else:
                    assert copied == [path]
                    assert path.name.startswith(f"body-{os.getpid()}-{message_id}-")
            assert list(spool.iterdir()) == []
            # Removed on an error in the delivery too.
            try:
                async with body_file(store, message_id, spool):
                    raise RuntimeError("the delivery failed")
            except RuntimeError:
                pass
            assert list(spool.iterdir()) == []

    asyncio.run(main())


def test_copies_of_a_gone_process_are_removed(tmp_path: Path) -> None:
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    gone = int(ended.stdout)
    stale = tmp_path / f"body-{gone}-1ABC-x1.eml"
    mine = tmp_path / f"body-{os.getpid()}-1ABD-x2.eml"
    other = tmp_path / "queue.sqlite3"
    for path in (stale, mine, other):
        path.write_bytes(b"data")
    assert remove_stale_bodies(tmp_path) == 1
    assert sorted(tmp_path.iterdir()) == sorted([mine, other])
