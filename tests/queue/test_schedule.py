"""Durations, the retry schedule and its jitter, and the policy built from settings."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.queue import (
    DEFAULT_RETRY_SCHEDULE,
    DurationError,
    QueuePolicy,
    RetrySchedule,
    format_duration,
    parse_duration,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5m", 300),
        ("1h30m", 5400),
        ("5d", 432_000),
        ("2w", 1_209_600),
        ("45s", 45),
        ("1.5h", 5400),
        ("1d2h3m4s", 93_784),
        (" 10M ", 600),
        ("0s", 0),
        (90, 90),
        (1.5, 1.5),
    ],
)
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty duration"),
        ("5", "has no unit"),
        ("5x", "unknown unit 'x'"),
        ("30m1h", "largest first"),
        ("5m5m", "largest first"),
        ("-5m", "expected <number><unit>"),
        ("5 m", "has no unit"),
        ("m", "expected <number><unit>"),
        (-1, ">= 0"),
        (math.inf, "finite"),
        (math.nan, "finite"),
    ],
)
def test_parse_duration_errors_say_what_is_wrong(text: str | float, complaint: str) -> None:
    with pytest.raises(DurationError, match=complaint):
        parse_duration(text)


def test_parse_duration_refuses_booleans_and_other_types() -> None:
    with pytest.raises(DurationError, match="not True"):
        parse_duration(True)
    with pytest.raises(DurationError):
        parse_duration(["5m"])  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=10**9))
def test_format_then_parse_gives_the_same_whole_seconds(seconds: int) -> None:
    text = format_duration(seconds)
    assert parse_duration(text) == seconds
    # Shortest form: every unit at most once, no zero parts.
    assert "0" not in text[:1] or text == "0s"


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False))
def test_format_then_parse_keeps_fractions(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-9, abs=1e-9)


@given(st.text(max_size=20))
def test_parse_duration_raises_only_duration_errors(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except DurationError as exc:
        assert str(exc)
    else:
        assert seconds >= 0 and math.isfinite(seconds)


@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=999), st.sampled_from("wdhms")),
        min_size=1,
        max_size=5,
        unique_by=lambda part: part[1],
    )
)
def test_parse_duration_sums_parts_in_unit_order(parts: list[tuple[int, str]]) -> None:
    size = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
    ordered = sorted(parts, key=lambda part: "wdhms".index(part[1]))
    text = "".join(f"{number}{unit}" for number, unit in ordered)
    assert parse_duration(text) == sum(number * size[unit] for number, unit in ordered)


def test_default_schedule_is_postfix_like_and_the_last_delay_repeats() -> None:
    schedule = RetrySchedule.parse(random=lambda: 0.5)
    assert DEFAULT_RETRY_SCHEDULE == ("5m", "10m", "20m", "40m", "66m")
    assert [schedule.delay(n) for n in range(1, 9)] == [
        300,
        600,
        1200,
        2400,
        3960,
        3960,
        3960,
        3960,
    ]
    assert RetrySchedule() == RetrySchedule.parse()  # the dataclass default is the same


@given(st.floats(min_value=0, max_value=1, exclude_max=True), st.integers(1, 20))
def test_jitter_stays_within_ten_percent(random_value: float, failures: int) -> None:
    schedule = RetrySchedule.parse(random=lambda: random_value)
    base = schedule.base_delay(failures)
    assert base * 0.9 <= schedule.delay(failures) <= base * 1.1


def test_jitter_spreads_delays() -> None:
    values = iter([0.0, 0.25, 0.75, 0.999999])
    schedule = RetrySchedule.parse(["10m"], random=lambda: next(values))
    assert [round(schedule.delay(1)) for _ in range(4)] == [540, 570, 630, 660]
    assert RetrySchedule.parse(["10m"], jitter=0, random=lambda: 0.0).delay(3) == 600


def test_schedule_errors_name_the_entry() -> None:
    with pytest.raises(DurationError, match="entry 2: invalid duration '10q'"):
        RetrySchedule.parse(["5m", "10q"])
    with pytest.raises(DurationError, match="at least one delay"):
        RetrySchedule.parse([])
    with pytest.raises(DurationError, match="must be > 0"):
        RetrySchedule.parse(["0s"])
    with pytest.raises(DurationError, match="jitter"):
        RetrySchedule.parse(["5m"], jitter=1.5)
    with pytest.raises(ValueError, match="failures"):
        RetrySchedule().base_delay(0)
    # A single string is one delay, not a list of characters.
    assert RetrySchedule.parse("7m").delays == (420.0,)


def test_policy_from_settings() -> None:
    policy = QueuePolicy.from_settings(
        retry_schedule=["1m", "2m"],
        lifetime="2d",
        bounce_lifetime="1d",
        delay_warning="4h",
        lease_time="5m",
        keep_finished="1h",
        random=lambda: 0.5,
    )
    assert policy.schedule.delays == (60.0, 120.0)
    assert (policy.lifetime, policy.bounce_lifetime, policy.delay_warning) == (
        172_800,
        86_400,
        14_400,
    )
    assert (policy.lease_time, policy.keep_finished) == (300, 3600)
    assert policy.expires_at(1000.0, "a@example.org") == 1000 + 172_800
    assert policy.expires_at(1000.0, "") == 1000 + 86_400
    defaults = QueuePolicy.from_settings()
    assert defaults.lifetime == 5 * 86_400
    assert defaults.delay_warning is None
    assert defaults.expires_at(0.0, "") == 5 * 86_400  # bounce_lifetime defaults to lifetime
    with pytest.raises(DurationError, match=r"^lifetime: "):
        QueuePolicy.from_settings(lifetime="forever")
    with pytest.raises(DurationError, match="lease_time must be > 0"):
        QueuePolicy(lease_time=0)
