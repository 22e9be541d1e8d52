"""The command line's log handler writes lines in batches: INFO lines within a tenth of a
second, warnings at once (with what waits before them, in order), everything at exit,
nothing twice in a forked worker."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from mailgate.server.logs import BatchingStreamHandler, TextFormatter


class CountingStream(io.StringIO):
    """A text stream that counts its writes (a write is a system call on a real one)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _logger(stream: CountingStream, interval: float = 0.1) -> logging.Logger:
    handler = BatchingStreamHandler(stream, interval=interval)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"test.batching.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def test_info_lines_are_written_together_within_the_interval() -> None:
    stream = CountingStream()
    logger = _logger(stream, interval=0.05)
    for number in range(100):
        logger.info("line %d", number)
    assert stream.getvalue() == ""  # nothing written per line
    deadline = time.monotonic() + 5
    while stream.getvalue().count("\n") < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.getvalue().splitlines() == [f"INFO line {n}" for n in range(100)]
    assert stream.writes == 1


def test_a_warning_is_written_at_once_after_what_waits() -> None:
    stream = CountingStream()
    logger = _logger(stream, interval=60)
    logger.info("first")
    logger.debug("second")
    assert stream.getvalue() == ""
    logger.warning("third")
    assert stream.getvalue().splitlines() == ["INFO first", "DEBUG second", "WARNING third"]
    logger.error("fourth")
    assert stream.getvalue().splitlines()[-1] == "ERROR fourth"


def test_many_lines_are_written_before_the_interval_when_enough_wait() -> None:
    stream = CountingStream()
    logger = _logger(stream, interval=60)
    for number in range(2000):  # about 80 KiB of lines: over the 64 KiB bound
        logger.info("a line long enough to fill the buffer soon: %04d", number)
    assert 0 < stream.getvalue().count("\n") < 2000
    assert stream.writes == 1


def test_a_forked_child_does_not_write_its_parents_lines_again(tmp_path: Path) -> None:
    log_file = tmp_path / "log"
    with log_file.open("w") as stream:
        handler = BatchingStreamHandler(stream, interval=60)
        handler.setFormatter(TextFormatter())
        logger = logging.getLogger("test.batching.fork")
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.info("from the parent")
        pid = os.fork()
        if pid == 0:  # the child: log, write at exit
            try:
                logger.info("from the child")
                handler.flush()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        handler.flush()
        logger.handlers.clear()
    lines = log_file.read_text().splitlines()
    assert sum("from the parent" in line for line in lines) == 1
    assert sum("from the child" in line for line in lines) == 1


def test_the_server_writes_every_line_before_it_exits(tmp_path: Path) -> None:
    """``python -m mailgate serve`` stopped by SIGTERM: its last INFO line ("stopped")
    is in its output, written at exit."""
    script = (
        "import os, signal, threading\n"
        "from mailgate.cli import main\n"
        "threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()\n"
        "raise SystemExit(main(['serve', '--listen', '127.0.0.1:0', '--sink',"
        f" '--state-dir', {str(tmp_path / 'state')!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "listening on 127.0.0.1" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].endswith("stopped; 0 messages accepted")
