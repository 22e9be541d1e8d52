"""Durations ("5m", "1h30m", "5d") and the retry schedule of deferred deliveries.

The schedule is a list of delays, the last one repeating: after the first failed attempt
the next one comes ``delays[0]`` later, after the second ``delays[1]`` later, and so on.
Each delay is spread by a random jitter (±10 % by default) so that messages deferred
together (a destination that was down) do not all come back in the same second.
"""

from __future__ import annotations

import math
import random as random_module
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

__all__ = [
    "DEFAULT_RETRY_SCHEDULE",
    "DurationError",
    "RetrySchedule",
    "format_duration",
    "parse_duration",
]

#: Postfix-like: 5, 10, 20, 40 minutes, then every 66 minutes.
DEFAULT_RETRY_SCHEDULE: tuple[str, ...] = ("5m", "10m", "20m", "40m", "66m")

_UNITS: dict[str, int] = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
_UNIT_ORDER = "wdhms"
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)")


class DurationError(ValueError):
    """A duration that cannot be read; the message says what was wrong and what is expected."""


def parse_duration(value: str | int | float) -> float:
    """Seconds in a duration.

    Strings are one or more ``<number><unit>`` parts with units ``w d h m s`` in that
    order, each at most once: ``"5m"``, ``"1h30m"``, ``"5d"``, ``"1.5h"``. A number (int
    or float, as TOML gives it) is seconds. Negative, infinite and NaN values are refused.
    """
    if isinstance(value, bool):  # bool is an int; True seconds is surely a mistake
        raise DurationError(f"a duration must be a number or a string like '5m', not {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0:
            raise DurationError(f"a duration must be a finite number >= 0, got {value!r}")
        return seconds
    if not isinstance(value, str):
        raise DurationError(f"a duration must be a number or a string like '5m', not {value!r}")
    text = value.strip()
    if not text:
        raise DurationError("empty duration: expected e.g. '5m', '1h30m' or '5d'")
    total = 0.0
    position = 0
    last_unit_index = -1
    while position < len(text):
        match = _PART.match(text, position)
        if match is None:
            raise DurationError(
                f"invalid duration {value!r}: expected <number><unit> parts like '1h30m' "
                f"(units w, d, h, m, s), found {text[position:]!r}"
            )
        number, unit = match.group(1), match.group(2).lower()
        if not unit:
            raise DurationError(
                f"invalid duration {value!r}: {number!r} has no unit (w, d, h, m or s)"
            )
        if unit not in _UNITS:
            raise DurationError(
                f"invalid duration {value!r}: unknown unit {match.group(2)!r} "
                f"(expected w, d, h, m or s)"
            )
        unit_index = _UNIT_ORDER.index(unit)
        if unit_index <= last_unit_index:
            raise DurationError(
                f"invalid duration {value!r}: units must be given largest first, "
                f"each at most once (e.g. '1h30m')"
            )
        last_unit_index = unit_index
        total += float(number) * _UNITS[unit]
        position = match.end()
    if not math.isfinite(total):
        raise DurationError(f"invalid duration {value!r}: too large")
    return total


def format_duration(seconds: float) -> str:
    """The shortest ``parse_duration`` text for a number of seconds (``"1h30m"``).

    Whole seconds are written with units; a fractional part is kept on the seconds.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise DurationError(f"cannot format {seconds!r} as a duration")
    whole = int(seconds)
    fraction = seconds - whole
    parts: list[str] = []
    for unit in _UNIT_ORDER:
        size = _UNITS[unit]
        count, whole = divmod(whole, size)
        if unit == "s" and fraction:
            # Positional digits of the shortest repr: no exponent for the parser to trip
            # on, and no digits lost to a fixed precision.
            parts.append(f"{Decimal(repr(count + fraction)):f}s")
        elif count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


@dataclass(frozen=True)
class RetrySchedule:
    """Delays between attempts, the last repeating, each spread by ±``jitter``.

    ``random`` returns a float in [0, 1) (``random.random`` by default; tests inject a
    fixed one).
    """

    delays: tuple[float, ...] = tuple(parse_duration(item) for item in DEFAULT_RETRY_SCHEDULE)
    jitter: float = 0.10
    random: Callable[[], float] = field(default=random_module.random, compare=False)

    def __post_init__(self) -> None:
        if not self.delays:
            raise DurationError("a retry schedule needs at least one delay")
        for delay in self.delays:
            if not math.isfinite(delay) or delay <= 0:
                raise DurationError(f"retry delays must be > 0, got {delay!r}")
        if not 0 <= self.jitter < 1:
            raise DurationError(f"jitter must be in [0, 1), got {self.jitter!r}")

    @classmethod
    def parse(
        cls,
        delays: Sequence[str | int | float] = DEFAULT_RETRY_SCHEDULE,
        *,
        jitter: float = 0.10,
        random: Callable[[], float] = random_module.random,
    ) -> RetrySchedule:
        """A schedule from configuration values (``["5m", "10m", ...]``)."""
        if isinstance(delays, str):  # a lone "5m" would iterate as characters
            delays = [delays]
        parsed: list[float] = []
        for index, item in enumerate(delays):
            try:
                parsed.append(parse_duration(item))
            except DurationError as exc:
                raise DurationError(f"retry schedule entry {index + 1}: {exc}") from None
        return cls(tuple(parsed), jitter, random)

    def base_delay(self, failures: int) -> float:
        """The delay after ``failures`` failed attempts (1 = after the first), no jitter."""
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        return self.delays[min(failures, len(self.delays)) - 1]

    def delay(self, failures: int) -> float:
        """``base_delay`` spread uniformly over ±``jitter`` of itself."""
        base = self.base_delay(failures)
        return base * (1.0 + self.jitter * (2.0 * self.random() - 1.0))
