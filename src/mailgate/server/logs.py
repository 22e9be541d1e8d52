"""Logging setup: human-readable text or one JSON object per line, written in batches."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
import weakref
from typing import TextIO

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {
    "message",
    "asctime",
}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """The text format, its timestamp formatted once a second: the server writes a line
    per message and per session, and strftime was a good part of each line's cost."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        # The format above written out: no usesTime() search of the format string, no
        # %-formatting of a dict per line. Exceptions and stacks as the base class has them.
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = message = record.getMessage()
        record.asctime = asctime = self.formatTime(record)
        return f"{asctime} {record.levelname} [{record.process}] {record.name}: {message}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes lines in batches instead of one write (and one
    flush, a system call) per line.

    The server logs a line per message and per session; at thousands of messages a
    second the write per line was a measurable part of each message's cost. Lines of
    level WARNING and above are written at once, with whatever waits before them; the
    others wait at most ``interval`` seconds (a thread of this handler writes them) or
    until ``max_pending`` characters are waiting. At exit the rest is written. What a
    ``kill -9`` can lose is the INFO and DEBUG lines of the last ``interval``, never a
    warning or an error.
    """

    def __init__(
        self, stream: TextIO, *, interval: float = 0.1, max_pending: int = 64 * 1024
    ) -> None:
        super().__init__(stream)
        self.interval = interval
        self.max_pending = max_pending
        self._pending: list[str] = []
        self._pending_size = 0
        self._due = threading.Event()
        self._closed = False
        self._writer: threading.Thread | None = None
        _batching.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        # Called with the handler's lock held (Handler.handle), as flush() takes it.
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        self._pending_size += len(line)
        if record.levelno >= logging.WARNING or self._pending_size >= self.max_pending:
            self._write_pending()
        elif len(self._pending) == 1:
            self._start_writer()
            self._due.set()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending()
        finally:
            self.release()

    def close(self) -> None:
        self.flush()
        self._closed = True
        self._due.set()
        super().close()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # a closed or broken stream: logging must not stop the server
            pass

    def _start_writer(self) -> None:
        if self._writer is None or not self._writer.is_alive():
            # A process forked with --workers has no thread: each worker starts its own.
            self._writer = threading.Thread(
                target=self._write_later, name="mailgate-log", daemon=True
            )
            self._writer.start()

    def _write_later(self) -> None:
        while not self._closed:
            self._due.wait()
            self._due.clear()
            time.sleep(self.interval)
            self.flush()

    def _forget_parent(self) -> None:
        """In a forked child: the parent's writer thread is not here (a new one starts
        with the next line), and nothing is pending (flushed before the fork)."""
        self._pending.clear()
        self._pending_size = 0
        self._writer = None
        self._due = threading.Event()


#: Every batching handler of the process: flushed before a fork (or a worker would write
#: its parent's waiting lines again) and at exit.
_batching: weakref.WeakSet[BatchingStreamHandler] = weakref.WeakSet()


def flush_logs() -> None:
    """Write every line the batching handlers hold (before ``os._exit``, which skips the
    exit handlers that would)."""
    for handler in list(_batching):
        handler.flush()


def _after_fork_in_child() -> None:
    for handler in list(_batching):
        handler._forget_parent()


atexit.register(flush_logs)
os.register_at_fork(before=flush_logs, after_in_child=_after_fork_in_child)


def setup_logging(fmt: str, level: str) -> None:
    """Log to stderr, as text or JSON lines, from ``level`` up (the command line's setup;
    an embedding program keeps its own)."""
    # What no format here shows, LogRecord need not collect on every line (the logging
    # HOWTO's "Optimization": the caller's frame, thread and multiprocessing names).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = BatchingStreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
