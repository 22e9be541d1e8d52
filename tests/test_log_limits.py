"""mailgate.hooks.logs.LogLimiter: a few lines of a kind per interval, then a count."""

from __future__ import annotations

import logging

import pytest

from mailgate.hooks.logs import LogLimiter


def test_burst_then_held_back_then_counted(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limiter = LogLimiter(burst=3, interval=10.0, clock=lambda: now[0])
    logger = logging.getLogger("test.limiter")
    caplog.set_level(logging.INFO, logger="test.limiter")
    written = [limiter.log(logger, logging.WARNING, "kind", "line %d", n) for n in range(100)]
    assert written.count(True) == 3
    assert limiter.log(logger, logging.WARNING, "other", "another kind")
    now[0] = 10.0
    assert limiter.log(logger, logging.WARNING, "kind", "line %d", 100)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:4] == ["line 0", "line 1", "line 2", "another kind"]
    assert messages[4] == "line 100 (97 similar lines suppressed in the last 10 s)"


def test_keys_are_bounded() -> None:
    limiter = LogLimiter(burst=1, max_keys=10)
    for key in range(1000):
        assert limiter.allow(key) == (True, 0)
    assert len(limiter._windows) <= 10


def test_a_disabled_level_costs_no_token() -> None:
    limiter = LogLimiter(burst=1)
    logger = logging.getLogger("test.limiter.quiet")
    logger.setLevel(logging.ERROR)
    assert not limiter.log(logger, logging.INFO, "kind", "not shown")
    assert limiter.allow("kind") == (True, 0)
