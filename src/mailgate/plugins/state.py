"""The ``[state]`` table: where the policy state of several nodes is kept.

By default (``backend = "memory"``) every process keeps its own rate counters and its
honeypot per-address counts in memory, and greylisting keeps its triplets in its SQLite
file: one node, as before. With ``backend = "redis"`` the rate limits, the greylisting
triplets and the honeypot's per-address counts live in one Redis server (``url``), so
that several nodes behind a load balancer count and remember as one server.

Redis is asked with a short ``timeout`` (well under the hook timeout); when it does not
answer (down, unreachable, slow), each policy *fails open* (the mail goes on as if
nothing were counted) or, with ``on_error = "closed"``, *fails closed* (a 4xx: the
client tries again later). An outage is logged once when it starts and once when Redis
answers again, not per message.

This module holds the settings and what the plugins share; the Redis stores themselves
are in :mod:`mailgate.plugins.redis_state`, imported only when asked for (``redis`` is
the optional ``mailgate[redis]`` extra).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import urlsplit

from mailgate.server.options import PolicySection
from mailgate.settings import (
    ConfigError,
    Value,
    build_fields,
    converters,
    did_you_mean,
    setting,
    settings_of,
)

__all__ = [
    "BACKENDS",
    "ON_ERROR",
    "REDIS_MISSING",
    "STATE_TABLE",
    "StateSettings",
    "StateUnavailable",
    "redacted_url",
    "state_settings",
]

STATE_TABLE: Final = "state"
BACKENDS: Final = ("memory", "redis")
ON_ERROR: Final = ("open", "closed")
#: The error when ``backend = "redis"`` is chosen without redis-py installed.
REDIS_MISSING: Final = '[state] backend = "redis" needs redis-py: pip install "mailgate[redis]"'
_SCHEMES: Final = ("redis", "rediss", "unix")


class StateUnavailable(Exception):
    """The shared state store did not answer (in time). ``fail_closed`` says what the
    policy asking should do: refuse with a 4xx (True) or go on as if nothing had been
    counted (False). The outage itself is logged by the store, once."""

    def __init__(self, message: str, *, fail_closed: bool) -> None:
        super().__init__(message)
        self.fail_closed = fail_closed


def _url(value: Value) -> str:
    """A Redis URL; errors never echo it (it may hold a password)."""
    text = converters.string(value).strip()
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme not in _SCHEMES:
        raise value.error(
            "expected a URL such as redis://host:6379/0, rediss://host:6380/0 (TLS) or "
            "unix:///run/redis/redis.sock"
        )
    return text


def redacted_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: what logs and errors may show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return url.replace(parts.netloc, f"{user}:***@{host}", 1)


def _prefix(value: Value) -> str:
    text = converters.string(value)
    if any(ch.isspace() for ch in text):
        raise value.error(f"must not contain spaces, got {text!r}")
    return text


@dataclass(frozen=True, slots=True)
class StateSettings:
    """The ``[state]`` table: where rate counters, greylisting triplets and the
    honeypot's per-address counts are kept."""

    backend: Literal["memory", "redis"] = setting(
        "memory",
        convert=converters.choice(BACKENDS),
        help="memory: each process counts on its own (greylisting in its SQLite file); "
        "redis: rate limits, greylisting and the honeypot's per-address counts in the Redis "
        "server of url, shared by every node using it (needs the redis extra)",
        group="state",
        choices=BACKENDS,
    )
    url: str | None = setting(
        None,
        convert=_url,
        help="the Redis server of backend = redis (redis://[:password@]host:6379/0, "
        "rediss:// for TLS, unix:///path/redis.sock); its password is never logged",
        group="state",
        metavar="URL",
        default_text="none; required with backend = redis",
    )
    timeout: float = setting(
        0.25,
        convert=converters.seconds,
        help="the longest a policy waits for Redis (connecting or answering) before it "
        "goes on as on_error says; must be under a quarter of hook_timeout",
        group="state",
        metavar="SECONDS",
    )
    on_error: Literal["open", "closed"] = setting(
        "open",
        convert=converters.choice(ON_ERROR),
        help="when Redis does not answer: open lets the mail through as if nothing were "
        "counted (greylisting passes it); closed answers 4xx so the client retries later",
        group="state",
        choices=ON_ERROR,
    )
    key_prefix: str = setting(
        "mailgate:",
        convert=_prefix,
        help="put before every Redis key, so that several mailgate clusters (or other "
        "programs) can share one Redis database",
        group="state",
        metavar="TEXT",
    )

    def __repr__(self) -> str:
        url = redacted_url(self.url) if self.url else None
        return (
            f"StateSettings(backend={self.backend!r}, url={url!r}, timeout={self.timeout!r}, "
            f"on_error={self.on_error!r}, key_prefix={self.key_prefix!r})"
        )

    @property
    def fail_closed(self) -> bool:
        return self.on_error == "closed"


#: Requests to the store one stage of a session may make at most: at RCPT, rate limits
#: (one, all its limits at once) and greylisting (its network, its triplet, the pass).
REQUESTS_PER_STAGE: Final = 4


def state_settings(
    sections: Iterable[PolicySection], *, hook_timeout: float | None = None
) -> StateSettings:
    """The ``[state]`` table of the configuration (defaults when there is none);
    ConfigError naming the file and key for a bad one. With ``hook_timeout``, the
    ``timeout`` must leave a stage's requests well inside it."""
    section = next((s for s in sections if s.name == STATE_TABLE), None)
    if section is None:
        return StateSettings()
    known = [item.key for item in settings_of(StateSettings)]
    values: dict[str, Value] = {}
    for key, raw in section.values.items():
        if key not in known:
            raise ConfigError(f"{section.source}: unknown key {key!r}{did_you_mean(key, known)}")
        values[key] = Value(raw, f"{section.source} {key}", section.base)
    settings = StateSettings(**build_fields(StateSettings, values, table=STATE_TABLE))
    if settings.backend == "redis":
        if settings.url is None:
            raise ConfigError(
                f'{section.source} url: required with backend = "redis" (redis://host:6379/0)'
            )
        try:
            import redis.asyncio  # noqa: F401  (said now, not at the first message)
        except ImportError:
            raise ConfigError(REDIS_MISSING) from None
        if hook_timeout and settings.timeout * REQUESTS_PER_STAGE >= hook_timeout:
            raise ConfigError(
                f"{section.source} timeout: {settings.timeout:g} s is not well under "
                f"hook_timeout ({hook_timeout:g} s): a stage may ask Redis "
                f"{REQUESTS_PER_STAGE} times; keep it below "
                f"{hook_timeout / REQUESTS_PER_STAGE:g} s (0.25 s is usual)"
            )
    return settings
