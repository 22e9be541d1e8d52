"""What every policy plugin shares: one log line and one count per decision, the marks
plugins leave for each other on a session, and reading a policy table of the config.

A decision is logged on the ``mailgate.policy`` logger as one line, with the fields also
attached to the record (``extra``) so the JSON log format carries them as keys::

    session 5K2J...0001: policy dnsbl: reject (127.0.0.2 in zen.example: listed)

and counted in :data:`DECISIONS` by (policy, verdict), which applications may read
(:func:`decide` and :data:`DECISIONS` live in :mod:`mailgate.plugins.decisions`, compiled
in the optional compiled build; they are the same objects here).
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import logging
import math
import re
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar

from mailgate.dns import Resolver
from mailgate.hooks import Message, Reject, Session, TempFail
from mailgate.protocol import Reply
from mailgate.server.options import Network, PolicySection, ServerOptions
from mailgate.settings import ConfigError

from .decisions import DECISIONS, DECISIONS_LOGGED_PER_SESSION, decide
from .state import REDIS_MISSING, StateSettings, state_settings

if TYPE_CHECKING:
    from .redis_state import RedisState

log = logging.getLogger("mailgate.policy")

#: session.notes keys plugins read from each other.
ALLOWLISTED = "policy.allowlisted"  # why the client is on an allow list (skips checks)
ANNOTATIONS = "policy.annotations"  # {policy: [(header, value)]} for the next messages

T = TypeVar("T")
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


#: A reply a plugin is told to refuse with instead of its own words (honeypot personas):
#: made for the session, so it may name the client.
RefusalText: TypeAlias = Callable[[Session], Reply]


def refusal(reply: Reply, *, disconnect: bool = False) -> Reject | TempFail:
    """``reply`` (4xx or 5xx) as the refusal a plugin raises: TempFail below 500, else
    Reject, with the reply's enhanced code."""
    kind = TempFail if reply.code < 500 else Reject
    return kind(reply.code, reply.text, enhanced=reply.status, disconnect=disconnect)


def allowlisted(session: Session) -> str | None:
    """Why the session's client is allow-listed, or None: DNSBL, greylisting and rate
    checks skip allow-listed clients."""
    reason = session.notes.get(ALLOWLISTED)
    return str(reason) if reason else None


def mark_allowlisted(session: Session, why: str) -> None:
    session.notes[ALLOWLISTED] = why


def exempt(session: Session, relay_networks: Iterable[Network]) -> str | None:
    """Why the session skips reputation checks (DNSBL, client checks, greylisting, SPF
    refusals), or None: an allow-listed client, an authenticated user, or a client in
    ``relay_networks`` (our own machines)."""
    reason = allowlisted(session)
    if reason:
        return f"allow-listed: {reason}"
    if session.user is not None:
        return f"authenticated as {session.user}"
    if in_networks(session.peer_host, relay_networks):
        return "in relay_networks"
    return None


def annotate(session: Session, policy: str, header: str, value: str) -> None:
    """Ask for a header on every later message of this session: what a policy that only
    annotates does instead of refusing. The policy's own ``on_message`` writes them with
    :func:`write_annotations` (so a plugin added from code needs nothing else)."""
    session.notes.setdefault(ANNOTATIONS, {}).setdefault(policy, []).append((header, value))


async def write_annotations(session: Session, message: Message, policy: str) -> None:
    """Prepend the headers ``policy`` asked for with :func:`annotate` to ``message``."""
    for header, value in session.notes.get(ANNOTATIONS, {}).get(policy, ()):
        await message.prepend_header(header, value)


@functools.lru_cache(maxsize=4096)
def client_address(ip: str) -> IPAddress | None:
    """``ip`` parsed (IPv4-mapped IPv6 as IPv4), None when it is not an address. Cached:
    several policies ask for every command of a session, and parsing is not free."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_networks(ip: str, networks: Iterable[Network]) -> bool:
    if not networks:
        return False
    address = client_address(ip)
    return address is not None and any(address in network for network in networks)


def normalise_domain(name: str) -> str:
    """Lower case, no final dot, non-ASCII labels as A-labels (``xn--...``), so that
    ``bücher.example`` and ``xn--bcher-kva.example`` are the same domain. Address
    literals (``[192.0.2.1]``) are only lowered."""
    name = name.strip().rstrip(".").lower()
    if name.isascii() or name.startswith("["):
        return name
    labels = []
    for label in name.split("."):
        if not label.isascii() and "*" not in label and "?" not in label:
            label = unicodedata.normalize("NFC", label)
            label = "xn--" + label.encode("punycode").decode("ascii")
        labels.append(label)
    return ".".join(labels)


class LazyResolver:
    """The ``resolver`` property of everything that looks names up in DNS: the resolver it
    was given (``_resolver``), else the shared one of the :class:`PolicyEnv` it was built
    from (``_env``), else a default :class:`~mailgate.dns.Resolver` (``_new_resolver``).
    Made on first use, so a server whose plugins never look anything up never builds one."""

    _resolver: Resolver | None = None
    _env: PolicyEnv | None = None

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:
            self._resolver = self._env.resolver if self._env is not None else self._new_resolver()
        return self._resolver

    def _new_resolver(self) -> Resolver:
        return Resolver()


@dataclass
class PolicyEnv(LazyResolver):
    """What the built-in policy plugins share in one server: its options, one DNS resolver
    (made on first use, so a server without DNS policies never builds one) and a clock
    (injectable for tests of windows and delays)."""

    options: ServerOptions
    clock: Callable[[], float] = time.time
    _resolver: Resolver | None = field(default=None, repr=False)
    #: The shared state store of ``[state]``: False until read (see shared_state).
    _state: RedisState | Literal[False] | None = field(default=False, repr=False)

    def _new_resolver(self) -> Resolver:
        return Resolver(self.options.dns_nameservers, timeout=self.options.dns_timeout)

    def shared_state(self) -> RedisState | None:
        """The Redis store ``[state] backend = "redis"`` names, one for every plugin of
        this server (one outage, one log line); None with the default ``memory``, where
        each plugin keeps its own state."""
        if self._state is False:
            try:
                settings = state_settings(
                    self.options.policy, hook_timeout=self.options.hook_timeout
                )
                self._state = open_state(settings)
            except ConfigError as exc:
                raise PolicyConfigError(str(exc)) from None
        return self._state

    def use_state(self, state: RedisState | None) -> None:
        """Use ``state`` instead of reading ``[state]`` (honeypot mode reads it itself)."""
        self._state = state

    def section(self, name: str) -> PolicySection | None:
        """The one table ``name`` of the configuration, or None."""
        return first_section(self.options.policy, name)

    def sections(self, name: str) -> list[PolicySection]:
        """Every table ``name`` (``[[dnsbl]]`` is an array of tables)."""
        return sections(self.options.policy, name)


def open_state(settings: StateSettings) -> RedisState | None:
    """The connection to the shared store ``[state]`` names (None: ``memory``, each
    plugin keeps its own state). Nothing is sent to Redis until a policy asks."""
    if settings.backend != "redis":
        return None
    try:
        from .redis_state import RedisState
    except ImportError as exc:
        raise ConfigError(f"{REDIS_MISSING} ({exc})") from None
    assert settings.url is not None  # state_settings requires it
    return RedisState(
        settings.url,
        timeout=settings.timeout,
        fail_closed=settings.fail_closed,
        key_prefix=settings.key_prefix,
    )


class PolicyConfigError(ValueError):
    """A policy table that cannot be used; the message names the file, table and key."""


class SectionReader:
    """Typed access to one policy table, with errors that say where. Call :meth:`done`
    at the end: keys nobody read are reported as unknown (with a "did you mean")."""

    def __init__(self, section: PolicySection) -> None:
        self.section = section
        self._read: set[str] = set()

    def error(self, key: str | None, problem: str) -> PolicyConfigError:
        where = self.section.source + (f" {key}" if key else "")
        return PolicyConfigError(f"{where}: {problem}")

    def _get(self, key: str, default: T, check: Callable[[Any], T]) -> T:
        self._read.add(key)
        if key not in self.section.values:
            return default
        raw = self.section.values[key]
        try:
            return check(raw)
        except (TypeError, ValueError) as exc:
            raise self.error(key, str(exc)) from None

    def string(self, key: str, default: str | None = None) -> str | None:
        return self._get(key, default, _string)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        def check(raw: Any) -> str:
            text = _string(raw).strip().lower()
            if text not in choices:
                raise ValueError(f"{raw!r} is not one of {', '.join(choices)}")
            return text

        return self._get(key, default, check)

    def boolean(self, key: str, default: bool) -> bool:
        def check(raw: Any) -> bool:
            if not isinstance(raw, bool):
                raise ValueError(f"expected true or false, got {raw!r}")
            return raw

        return self._get(key, default, check)

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        def check(raw: Any) -> float:
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise ValueError(f"expected a number, got {raw!r}")
            if not math.isfinite(raw) or raw < minimum:
                raise ValueError(f"must be at least {minimum:g}, got {raw}")
            return float(raw)

        return self._get(key, default, check)

    def count(self, key: str, default: int | None, *, minimum: int = 1) -> int | None:
        def check(raw: Any) -> int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise ValueError(f"expected a whole number, got {raw!r}")
            if raw < minimum:
                raise ValueError(f"must be at least {minimum}, got {raw}")
            return raw

        return self._get(key, default, check)

    def seconds(self, key: str, default: float) -> float:
        """A duration: a number of seconds, or a string with a unit: "90s", "5m", "2h",
        "36d"."""
        return self._get(key, default, parse_duration)

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        def check(raw: Any) -> tuple[str, ...]:
            if isinstance(raw, str):
                raw = [raw]
            if not isinstance(raw, list) or not all(isinstance(i, str) for i in raw):
                raise ValueError(f"expected a list of strings, got {raw!r}")
            return tuple(raw)

        return self._get(key, default, check)

    def networks(self, key: str) -> tuple[Network, ...]:
        def check(raw: Any) -> tuple[Network, ...]:
            out = []
            for item in _as_list(raw):
                for part in item.split(","):
                    part = part.strip()
                    if part:
                        try:
                            out.append(ipaddress.ip_network(part, strict=False))
                        except ValueError:
                            raise ValueError(f"{part!r} is not an IP network (CIDR)") from None
            return tuple(out)

        return self._get(key, (), check)

    def size(self, key: str, default: int) -> int:
        """Bytes, or a string with a unit: K, M, G (1024-based), KB, MB, GB (1000-based)."""
        return self._get(key, default, parse_size)

    def path(self, key: str) -> Path | None:
        def check(raw: Any) -> Path:
            text = _string(raw).strip()
            if not text:
                raise ValueError("empty path")
            path = Path(text).expanduser()
            base = self.section.base
            return base / path if base is not None and not path.is_absolute() else path

        return self._get(key, None, check)

    def done(self) -> None:
        unknown = [key for key in self.section.values if key not in self._read]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, sorted(self._read), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.error(None, f"unknown key {key!r}{hint}")


_SIZE = re.compile(r"\s*(\d+)\s*([a-z]*)\s*", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gib": 1024**3,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}


def parse_size(raw: Any) -> int:
    """``10485760``, ``"10M"`` (MiB), ``"10MB"`` (10**7) -> bytes."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        if raw < 0:
            raise ValueError(f"must not be negative, got {raw}")
        return raw
    if isinstance(raw, str):
        match = _SIZE.fullmatch(raw)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    raise ValueError(f'{raw!r} is not a size (bytes, or e.g. "512K", "10M", "10MB")')


_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError(f"expected a duration, got {raw!r}")
    if isinstance(raw, int | float):
        seconds = float(raw)
    elif isinstance(raw, str):
        text = raw.strip().lower()
        number = text.rstrip("smhdw")
        unit = text[len(number) :]
        if unit not in _UNITS:
            raise ValueError(f'{raw!r} is not a duration (e.g. 30, "90s", "5m", "2h", "36d")')
        try:
            seconds = float(number) * _UNITS[unit]
        except ValueError:
            raise ValueError(f'{raw!r} is not a duration (e.g. 30, "90s", "5m")') from None
    else:
        raise ValueError(f"expected a duration, got {raw!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"must not be negative, got {raw!r}")
    return seconds


def _string(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {raw!r}")
    return raw


def _as_list(raw: Any) -> list[str]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and all(isinstance(i, str) for i in raw):
        return list(raw)
    raise ValueError(f"expected a list of strings, got {raw!r}")


def sections(all_sections: Iterable[PolicySection], name: str) -> list[PolicySection]:
    return [s for s in all_sections if s.name == name]


def first_section(all_sections: Iterable[PolicySection], name: str) -> PolicySection | None:
    found = sections(all_sections, name)
    return found[0] if found else None


__all__ = [
    "ALLOWLISTED",
    "ANNOTATIONS",
    "DECISIONS",
    "DECISIONS_LOGGED_PER_SESSION",
    "LazyResolver",
    "PolicyConfigError",
    "PolicyEnv",
    "SectionReader",
    "allowlisted",
    "annotate",
    "client_address",
    "decide",
    "exempt",
    "first_section",
    "in_networks",
    "mark_allowlisted",
    "normalise_domain",
    "parse_duration",
    "parse_size",
    "sections",
    "write_annotations",
]
