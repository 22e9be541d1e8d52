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
from collections.abc import Mapping
from typing import Any, Final, TextIO, TypeVar

_Class = TypeVar("_Class", bound=type)


def _python_class(cls: _Class) -> _Class:
    """Leaves a class an ordinary Python class in the optional compiled build (mypyc makes
    no native class of one with a decorator it does not know; its methods are compiled all
    the same). The classes here subclass ``logging`` classes whose instances have a
    ``__dict__``: a native subclass would lay that dict out a second time, in its own
    place, and the garbage collector then crashed now and then (docs/benchmarks.md)."""
    return cls


#: The milliseconds of a timestamp as written ("007"): looked up, not formatted. In the
#: compiled build an f-string with a format spec (or a piece not known to be text) formats
#: every piece with a call of str.format; one of text pieces only is joined at once.
_MILLIS: Final = tuple(f"{n:03d}" for n in range(1000))

_WARNING: Final = logging.WARNING

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {
    "message",
    "asctime",
}


@_python_class
class JSONFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        fields = {
            key: value
            for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_")
        }
        exception = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(
            record.created,
            record.msecs,
            record.levelname,
            record.process,
            record.name,
            record.getMessage(),
            fields,
            exception,
        )

    def line(
        self,
        created: float,
        msecs: float,
        levelname: str,
        pid: int | None,
        name: str,
        message: str,
        fields: Mapping[str, Any] | None,
        exception: str | None = None,
    ) -> str:
        """One line from a record's parts (``fields``: its extra attributes)."""
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        entry = {
            "ts": f"{self._stamp}.{_MILLIS[int(msecs)]}Z",
            "level": levelname.lower(),
            "logger": name,
            "pid": pid,
            "msg": message,
        }
        if fields:
            for key, value in fields.items():
                if key not in _STANDARD and not key.startswith("_"):
                    entry[key] = value
        if exception:
            entry["exception"] = exception
        return json.dumps(entry, default=str)


@_python_class
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
        return self._asctime(record.created, record.msecs)

    def _asctime(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._stamp},{_MILLIS[int(msecs)]}"

    def line(
        self,
        created: float,
        msecs: float,
        levelname: str,
        pid: int | None,
        name: str,
        message: str,
        fields: Mapping[str, Any] | None = None,
    ) -> str:
        """One line from a record's parts (the text format shows no extra fields)."""
        return _text_line(self, created, msecs, levelname, str(pid), name, message)


def _text_line(
    formatter: TextFormatter,
    created: float,
    msecs: float,
    levelname: str,
    process: str,
    name: str,
    message: str,
) -> str:
    """TextFormatter.line, as a function: write_line calls it directly (compiled, a call
    of a module function needs no look-up of a method on a Python class)."""
    # _asctime written out: a line per message, and a call less for each.
    second = int(created)
    if second != formatter._second:
        formatter._stamp = time.strftime(formatter.default_time_format, formatter.converter(second))
        formatter._second = second
    stamp: str = formatter._stamp
    return f"{stamp},{_MILLIS[int(msecs)]} {levelname} [{process}] {name}: {message}"


@_python_class
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
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._add(line + self.terminator, record.levelno)

    def write_line(
        self, level: int, name: str, message: str, fields: Mapping[str, Any] | None
    ) -> None:
        """Write what a record of ``level`` from logger ``name`` with ``message`` (and
        ``fields``, its extra attributes) would give, without making the record: for
        :func:`log_line`, once :func:`lean_handler` said this handler alone would see it."""
        if _TIME_NS:
            created, msecs = _now()
        else:  # _now() written out for this Python: a call less per line
            created = time.time()
            msecs = int((created - int(created)) * 1000) + 0.0
        levelname = _LEVEL_NAMES.get(level) or logging.getLevelName(level)
        formatter = self.formatter
        try:
            if type(formatter) is TextFormatter:
                line = _text_line(formatter, created, msecs, levelname, _pid_text, name, message)
            else:
                assert isinstance(formatter, JSONFormatter)
                line = formatter.line(created, msecs, levelname, _pid, name, message, fields)
        except Exception:
            # What the stdlib path does with a line that cannot be formatted.
            record = logging.LogRecord(name, level, "", 0, message, None, None)
            if fields:
                record.__dict__.update(fields)
            self.handle(record)
            return
        with self.lock:  # type: ignore[union-attr]
            _queue(self, line + self.terminator, level)

    def _add(self, line: str, level: int) -> None:
        """Queue ``line`` (the handler's lock held)."""
        _queue(self, line, level)

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


def _queue(handler: BatchingStreamHandler, line: str, level: int) -> None:
    """BatchingStreamHandler._add, as a function (see _text_line)."""
    pending = handler._pending
    pending.append(line)
    handler._pending_size += len(line)
    if level >= _WARNING or handler._pending_size >= handler.max_pending:
        handler._write_pending()
    elif len(pending) == 1:
        handler._start_writer()
        handler._due.set()


#: Every batching handler of the process: flushed before a fork (or a worker would write
#: its parent's waiting lines again) and at exit.
_batching: weakref.WeakSet[BatchingStreamHandler] = weakref.WeakSet()


def flush_logs() -> None:
    """Write every line the batching handlers hold (before ``os._exit``, which skips the
    exit handlers that would)."""
    for handler in list(_batching):
        handler.flush()


def _after_fork_in_child() -> None:
    global _pid, _pid_text
    _pid = os.getpid()
    _pid_text = str(_pid)
    for handler in list(_batching):
        handler._forget_parent()


# --- lines written without a LogRecord ---------------------------------------------------------
#
# The server logs a line per message and per session (and a policy decision or two). Made
# the stdlib way, each line is a LogRecord (a dozen attributes, the time, a getpid system
# call, the thread), a walk of the logger tree, a handler lock and a format. When the
# command line's handler is the only one the line would reach, log_line() formats the
# documented text or JSON line itself, byte for byte what the formatters above make of the
# record; whenever anything else might see it (a handler or filter of an embedding program,
# pytest's caplog, another record factory), it is an ordinary record as before.

#: The pid the lines show: asked once, and again in a forked worker.
_pid: int | None = os.getpid()
_pid_text = str(_pid)  # as the text format shows it
#: getLevelName's table (read, never copied: addLevelName changes it in place).
_LEVEL_NAMES: dict[int, str] = logging._levelToName


#: Whether LogRecord takes its time from time_ns() (3.13 on): _now() and write_line.
_TIME_NS = sys.version_info >= (3, 13)


def _now() -> tuple[float, float]:
    """``(created, msecs)`` as LogRecord computes them on this Python."""
    if _TIME_NS:
        ns = time.time_ns()
        created = ns / 1e9
        msecs = (ns % 1_000_000_000) // 1_000_000 + 0.0
        if msecs == 999.0 and int(created) != ns // 1_000_000_000:
            msecs = 0.0  # as LogRecord: created rounded up to the next second
        return created, msecs
    created = time.time()
    return created, int((created - int(created)) * 1000) + 0.0


def lean_handler(logger: logging.Logger, level: int) -> BatchingStreamHandler | None:
    """The command line's handler when it alone would write a line of ``level`` from
    ``logger``, as set up by :func:`setup_logging` (its own formatter, no filter anywhere,
    the standard logger class and record factory); None when anything else could see the
    record. Read on every line (a handful of attribute reads): handlers added later, by an
    embedding program or a test, are seen at the next line."""
    if (
        logger.filters
        or logger.disabled
        or type(logger) is not logging.Logger
        # getLogRecordFactory() without its call (a Python function, on every line).
        or logging._logRecordFactory is not logging.LogRecord  # type: ignore[attr-defined]
        or not logging.logProcesses
    ):
        return None
    found = None
    current: logging.Logger | None = logger
    while current is not None:
        handlers = current.handlers
        if handlers:
            if found is not None or len(handlers) != 1:
                return None
            found = handlers[0]
        if not current.propagate:
            break
        current = current.parent
    if (
        type(found) is not BatchingStreamHandler
        or found.filters
        or level < found.level
        or type(found.formatter) not in _LEAN_FORMATTERS
    ):
        return None
    return found


_LEAN_FORMATTERS = (TextFormatter, JSONFormatter)
#: The record's place (funcName, lineno) is log_line's caller: one frame up, unless this
#: module is compiled (the optional mypyc build), where log_line has no frame of its own.
_CALLER = 2 if __file__.endswith(".py") else 1


def log_line(
    logger: logging.Logger,
    level: int,
    msg: str,
    args: tuple[Any, ...],
    extra: Mapping[str, Any] | None = None,
    text: str | None = None,
) -> None:
    """``logger.log(level, msg, *args, extra=extra)`` for a logger the caller found
    enabled for ``level``: written by the command line's handler directly when it alone
    would see the record (see :func:`lean_handler`), else logged as usual. ``text``, when
    given, is ``msg % args`` made by the caller (an f-string of the parts costs less than
    the %-formatting): the direct path writes it; an ordinary record keeps msg and args."""
    handler = lean_handler(logger, level)
    if handler is None:
        logger.log(level, msg, *args, extra=extra, stacklevel=_CALLER)
        return
    if text is not None:
        message = text
    elif args and len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
        message = msg % args[0]  # what LogRecord does with a lone mapping
    else:
        message = msg % args if args else msg
    handler.write_line(level, logger.name, message, extra)


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
