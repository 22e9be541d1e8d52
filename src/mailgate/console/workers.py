"""One view of the counters across ``--workers N`` processes.

Each worker process counts for itself (the connection driver adds to plain integers of
its own server). With several workers, each one's console publishes its snapshot as a
JSON file in a directory of the run, ``STATE_DIR/console/run-<parent pid>/<pid>.json``,
once a second and at every scrape; the worker that answers a scrape sums every file of
the run (:func:`mailgate.console.metrics.merge`). Whichever worker the kernel hands the
scrape to, the answer is the same, at most a second behind for the other workers, and no
counter ever goes back from one scrape to the next.

Counters stay monotonic: a worker that died keeps its last file (what it counted still
happened), but its open connections are not counted. Directories of earlier runs are
removed when a run starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from .metrics import Snapshot, merge

__all__ = ["SharedCounters"]

log = logging.getLogger("mailgate.console")

#: Gauges: what a dead process's file must not add.
_GAUGES: Final = ("connections_open",)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class SharedCounters:
    """The counter files of one run of worker processes, seen from one of them."""

    def __init__(
        self,
        state_dir: Path,
        snapshot: Callable[[], Snapshot],
        *,
        interval: float = 1.0,
        run_id: int | None = None,
    ) -> None:
        self.root = state_dir / "console"
        self.run_id = run_id if run_id is not None else os.getppid()
        self.directory = self.root / f"run-{self.run_id}"
        self.snapshot = snapshot
        self.interval = interval
        self.path = self.directory / f"{os.getpid()}.json"
        self._task: asyncio.Task[None] | None = None

    def setup(self) -> None:
        """Create the run's directory and remove those of runs that ended."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for entry in self.root.iterdir():
            if entry == self.directory or not entry.name.startswith("run-"):
                continue
            try:
                pid = int(entry.name.removeprefix("run-"))
            except ValueError:
                continue
            if not _alive(pid):
                shutil.rmtree(entry, ignore_errors=True)

    def publish(self) -> None:
        """Write this process's snapshot (atomically: readers never see half a file)."""
        data = json.dumps(self.snapshot(), separators=(",", ":"))
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(data)
        os.replace(temporary, self.path)

    def total(self) -> Snapshot:
        """The sum of every worker's file, this process's written fresh first.

        Summing files only (not this process's live counters beside the others' files)
        keeps every counter monotonic whichever worker answers: each file only grows,
        so a later scrape reads each one at least as far as an earlier scrape did."""
        self.publish()
        total: Snapshot = {}
        for path in self.directory.glob("*.json"):
            try:
                other: dict[str, Any] = json.loads(path.read_text())
                pid = int(path.stem)
            except (OSError, ValueError):
                continue  # written by no worker of ours, or gone meanwhile
            if not _alive(pid):
                for gauge in _GAUGES:
                    other.pop(gauge, None)
            merge(total, other)
        return total

    async def start(self) -> None:
        await asyncio.to_thread(self.setup)
        await asyncio.to_thread(self.publish)
        self._task = asyncio.get_running_loop().create_task(self._publish_every())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # The last figures of this worker stay for the others (counters never go back).
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.publish)

    async def _publish_every(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.to_thread(self.publish)
            except OSError as exc:
                log.warning("console: cannot publish this worker's counters: %s", exc)
