"""Lines the server writes without a LogRecord (server.logs.log_line): byte for byte what
the command line's text and JSON formatters make of the ordinary record, and an ordinary
record whenever anything but the command line's handler could see it."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgate.server.logs import (
    BatchingStreamHandler,
    JSONFormatter,
    TextFormatter,
    flush_logs,
    lean_handler,
    log_line,
)

FIELDS: dict[str, Any] = {
    "session": "5K2J0001",
    "client": "192.0.2.7",
    "helo": None,
    "sender": "a\u00e9@example.com",
    "recipients": ["b@example.com", "c@example.com"],
    "rcpt_count": 2,
    "size": 1024,
    "duration": 0.125,
    "_private": "not shown",
}
ARGS = ("5K2J0001", "Q1", "accepted", "a\u00e9@example.com", "<b@example.com>", "", 1024)
FORMAT = "session %s: message %s %s from=<%s> to=%s%s size=%d"


@pytest.fixture(params=["text", "json"])
def setup(request: pytest.FixtureRequest) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger tree like the command line's: one BatchingStreamHandler at the top (pytest's
    own capture handlers, added for each test phase, are taken off in the test: see
    _only)."""
    stream = io.StringIO()
    handler = BatchingStreamHandler(stream, interval=60)
    handler.setFormatter(TextFormatter() if request.param == "text" else JSONFormatter())
    top = logging.getLogger(f"test.lean.{request.param}")
    top.handlers[:] = [handler]
    top.propagate = False
    top.setLevel(logging.DEBUG)
    yield logging.getLogger(f"{top.name}.session"), stream
    top.handlers[:] = []
    handler.close()


def _only(logger: logging.Logger) -> BatchingStreamHandler:
    """Leave the test's handler the only one above ``logger``, as the command line's is."""
    top = logger.parent
    assert top is not None
    handler = next(h for h in top.handlers if isinstance(h, BatchingStreamHandler))
    top.handlers[:] = [handler]
    return handler


def _written(handler_stream: io.StringIO) -> list[str]:
    flush_logs()
    lines = handler_stream.getvalue().splitlines()
    handler_stream.seek(0)
    handler_stream.truncate()
    return lines


@pytest.mark.parametrize(
    "now",
    [1_700_000_000.0, 1_700_000_000.0005, 1_700_000_000.999_999, 1_700_000_061.25],
)
def test_a_lean_line_is_the_line_the_record_gives(
    setup: tuple[logging.Logger, io.StringIO], now: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    logger, stream = setup
    _only(logger)
    monkeypatch.setattr(time, "time", lambda: now)
    monkeypatch.setattr(time, "time_ns", lambda: int(now * 1e9))
    made: list[logging.LogRecord] = []
    make_record = logging.Logger.makeRecord

    def counting(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
        made.append(record := make_record(self, *args, **kwargs))
        return record

    monkeypatch.setattr(logging.Logger, "makeRecord", counting)
    for level in (logging.INFO, logging.WARNING):
        logger.log(level, FORMAT, *ARGS, extra=FIELDS)
        (expected,) = _written(stream)
        log_line(logger, level, FORMAT, ARGS, FIELDS)
        (lean,) = _written(stream)
        assert lean == expected
    assert len(made) == 2  # the two ordinary calls; log_line made none
    assert str(os.getpid()) in lean
    if isinstance(_only(logger).formatter, JSONFormatter):
        entry = json.loads(lean)
        assert list(entry)[:5] == ["ts", "level", "logger", "pid", "msg"]
        assert entry["helo"] is None and entry["recipients"] == FIELDS["recipients"]
        assert "_private" not in entry


def test_a_line_without_fields_and_arguments(
    setup: tuple[logging.Logger, io.StringIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    logger, stream = setup
    _only(logger)
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.5)
    monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000_500_000_000)
    logger.info("100% plain")
    log_line(logger, logging.INFO, "100% plain", ())
    first, second = _written(stream)
    assert first == second and "100% plain" in first


def test_another_handler_gets_an_ordinary_record(
    setup: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = setup
    _only(logger)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    logger.addHandler(keep)
    try:
        assert lean_handler(logger, logging.INFO) is None
        log_line(logger, logging.INFO, FORMAT, ARGS, FIELDS)
    finally:
        logger.removeHandler(keep)
    (record,) = records
    assert record.getMessage() == FORMAT % ARGS
    assert record.msg == FORMAT and record.args == ARGS
    assert record.session == "5K2J0001" and record.size == 1024  # type: ignore[attr-defined]
    # The caller's place, not log_line's.
    assert record.funcName == "test_another_handler_gets_an_ordinary_record"
    assert len(_written(stream)) == 1  # and the command line's handler wrote it as usual
    assert lean_handler(logger, logging.INFO) is not None


def test_filters_and_foreign_formatters_take_the_ordinary_path(
    setup: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = setup
    handler = _only(logger)
    assert lean_handler(logger, logging.INFO) is handler
    seen: list[str] = []

    def note(record: logging.LogRecord) -> bool:
        seen.append(record.getMessage())
        return True

    for owner in (logger, handler):
        owner.addFilter(note)
        assert lean_handler(logger, logging.INFO) is None
        log_line(logger, logging.INFO, "filtered %d", (1,))
        owner.removeFilter(note)
    assert seen == ["filtered 1", "filtered 1"]
    formatter = handler.formatter
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    assert lean_handler(logger, logging.INFO) is None
    log_line(logger, logging.INFO, "own format %s", ("kept",))
    handler.setFormatter(formatter)
    assert _written(stream)[-1] == "INFO own format kept"
    handler.setLevel(logging.WARNING)
    assert lean_handler(logger, logging.INFO) is None
    handler.setLevel(logging.NOTSET)


def test_a_forked_child_shows_its_own_pid(tmp_path: Path) -> None:
    log_file = tmp_path / "log"
    with log_file.open("w") as stream:
        handler = BatchingStreamHandler(stream, interval=60)
        handler.setFormatter(TextFormatter())
        logger = logging.getLogger("test.lean.fork")
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO)
        try:
            log_line(logger, logging.INFO, "parent", ())
            child = os.fork()
            if child == 0:  # pragma: no cover - the child
                try:
                    log_line(logger, logging.INFO, "child", ())
                    flush_logs()
                finally:
                    os._exit(0)
            os.waitpid(child, 0)
            flush_logs()
        finally:
            logger.handlers[:] = []
            handler.close()
    lines = log_file.read_text().splitlines()
    assert {line.rsplit(" ", 1)[1]: line for line in lines}.keys() == {"parent", "child"}
    pids = {line.rsplit(" ", 1)[1]: line.split("[")[1].split("]")[0] for line in lines}
    assert pids == {"parent": str(os.getpid()), "child": str(child)}
