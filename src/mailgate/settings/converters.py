"""Converters: each takes a raw :class:`Value` (from a flag, a file or code) and returns
the setting's value or raises the value's ConfigError, naming where it came from.

Flag values arrive as strings (lists of strings for repeatable flags, booleans for
switches); file and code values as TOML gives them. Both go through the same checks.
"""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

from mailgate.protocol.sasl import MECHANISMS

from .values import Value, toml_type

T = TypeVar("T")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: SASL mechanisms mailgate implements and can let succeed (DIGEST-MD5 is capture only:
#: a honeypot persona may offer it, a server setting may not).
AUTH_MECHANISMS: tuple[str, ...] = tuple(
    name for name, mechanism in MECHANISMS.items() if not mechanism.capture_only
)

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "ki": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}
_SIZE_RE = re.compile(r"\s*(\d+)\s*([a-z]*)\s*", re.IGNORECASE | re.ASCII)
# Letters, digits, hyphens and (seen in container and Windows names) underscores.
_LABEL_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE)
_URL_RE = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<rest>[^\s]+)", re.IGNORECASE)


def is_host_name(name: str) -> bool:
    """A syntactically valid host name or IPv4 address (no lookup)."""
    labels = name.removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):
        # Looks like an IPv4 address, so it has to be a valid one.
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return False
        return True
    return (
        name.isascii() and len(name) <= 253 and all(_LABEL_RE.fullmatch(label) for label in labels)
    )


def string(value: Value) -> str:
    if not isinstance(value.raw, str):
        raise value.error(f"expected a string, got {toml_type(value.raw)}")
    return value.raw


def string_list(value: Value) -> list[str]:
    """A list of strings; one string is a list of one."""
    raw = value.raw
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list | tuple):
        for item in raw:
            if not isinstance(item, str):
                raise value.error(
                    f"expected a list of strings, got a list holding {toml_type(item)} {item!r}"
                )
        return list(raw)
    raise value.error(f"expected a list of strings, got {toml_type(raw)}")


def path(value: Value) -> Path:
    """A path; relative to the file's directory when it came from a file, ``~`` expanded."""
    text = string(value)
    if not text.strip():
        raise value.error("empty path")
    result = Path(text)
    if value.base is not None:
        result = value.base / result.expanduser()
    return result


def path_or_stdout(value: Value) -> str:
    """A file (resolved like other paths) or "-" for stdout."""
    text = string(value).strip()
    if text == "-":
        return text
    return str(path(value))


def boolean(value: Value) -> bool:
    if not isinstance(value.raw, bool):
        raise value.error(f"expected true or false, got {toml_type(value.raw)}")
    return value.raw


def hostname(value: Value) -> str:
    name = string(value).strip()
    if not name or not is_host_name(name):
        raise value.error(f"{name!r} is not a valid host name")
    return name


def _number(value: Value, parse: Callable[[str], T], kinds: tuple[type, ...], what: str) -> T:
    raw = value.raw
    if isinstance(raw, str):
        try:
            return parse(raw.strip())
        except ValueError:
            raise value.error(f"{raw!r} is not {what}") from None
    if isinstance(raw, bool) or not isinstance(raw, kinds):
        raise value.error(f"expected {what}, got {toml_type(raw)}")
    return cast(T, raw)


def count(value: Value) -> int:
    """A whole number of at least 1."""
    number = _number(value, int, (int,), "a whole number")
    if number < 1:
        raise value.error(f"must be at least 1, got {number}")
    return number


def count_or_zero(value: Value) -> int:
    """A whole number of at least 0 (0: off)."""
    number = _number(value, int, (int,), "a whole number")
    if number < 0:
        raise value.error(f"must be 0 or more, got {number}")
    return number


def seconds(value: Value) -> float:
    """A positive number of seconds."""
    result = float(_number(value, float, (int, float), "a number of seconds"))
    if not math.isfinite(result) or result <= 0:
        raise value.error(f"must be a positive number of seconds, got {value.raw}")
    return result


def seconds_or_zero(value: Value) -> float:
    """Zero or a positive number of seconds."""
    result = float(_number(value, float, (int, float), "a number of seconds"))
    if not math.isfinite(result) or result < 0:
        raise value.error(f"must be zero or a positive number of seconds, got {value.raw}")
    return result


def size(value: Value) -> int:
    """Bytes: a number, or a string with a K/M/G (1024-based) or KB/MB/GB suffix."""
    raw = value.raw
    if isinstance(raw, int) and not isinstance(raw, bool):
        result = raw
    elif isinstance(raw, str):
        match = _SIZE_RE.fullmatch(raw)
        if raw.strip().startswith("-"):
            raise value.error(f"must not be negative, got {raw.strip()}")
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise value.error(
                f"{raw!r} is not a size; use bytes or a suffix: K, M, G (1024-based) "
                "or KB, MB, GB (1000-based)"
            )
        result = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    else:
        raise value.error(f"expected a number of bytes, got {toml_type(raw)}")
    if result < 0:
        raise value.error(f"must not be negative, got {result}")
    return result


def size_text(size_in_bytes: int) -> str:
    """A size for help texts: "26214400, i.e. 25M"."""
    for suffix, unit in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size_in_bytes >= unit and size_in_bytes % unit == 0:
            return f"{size_in_bytes}, i.e. {size_in_bytes // unit}{suffix}"
    return str(size_in_bytes)


def choice(allowed: tuple[str, ...]) -> Callable[[Value], str]:
    """One of ``allowed``, case-insensitively."""

    def convert(value: Value) -> str:
        text = string(value).strip().lower()
        if text not in allowed:
            raise value.error(f"{value.raw!r} is not one of {', '.join(allowed)}")
        return text

    return convert


def _items(value: Value) -> list[str]:
    """The non-empty items of a list of strings each of which may be comma-separated."""
    return [item.strip() for text in string_list(value) for item in text.split(",") if item.strip()]


def networks(value: Value) -> tuple[Network, ...]:
    """Networks in CIDR notation (a bare address is a /32 or /128)."""
    result: list[Network] = []
    for item in _items(value):
        try:
            result.append(ipaddress.ip_network(item))
        except ValueError as exc:
            if "host bits set" in str(exc):
                meant = ipaddress.ip_network(item, strict=False)
                raise value.error(f"{item} has host bits set; did you mean {meant}?") from None
            raise value.error(f"{item!r} is not a network in CIDR notation") from None
    return tuple(result)


def auth_users(value: Value) -> tuple[tuple[str, str], ...]:
    """``USER:PASSWORD`` entries; the error never echoes an entry (it holds a password)."""
    users: dict[str, str] = {}
    for entry in string_list(value):
        user, colon, password = entry.partition(":")
        if not colon or not user:
            raise value.error("expected USER:PASSWORD")
        if not password:
            raise value.error(f"empty password for user {user!r}")
        if user in users:
            raise value.error(f"user {user!r} is given twice")
        users[user] = password
    return tuple(users.items())


def mechanisms(value: Value) -> tuple[str, ...]:
    """SASL mechanism names, separated by commas or spaces."""
    result: list[str] = []
    for text in string_list(value):
        for item in text.replace(",", " ").split():
            name = item.upper()
            if name not in AUTH_MECHANISMS:
                raise value.error(f"{item!r} is not one of {', '.join(AUTH_MECHANISMS)}")
            if name not in result:
                result.append(name)
    return tuple(result)


def _urls(value: Value, schemes: tuple[str, ...], example: str) -> tuple[str, ...]:
    urls: list[str] = []
    for text in string_list(value):
        text = text.strip()
        match = _URL_RE.fullmatch(text)
        if not match or match.group("scheme").lower() not in schemes:
            raise value.error(
                f"{text!r} is not a {' or '.join(s + '://' for s in schemes)} URL (e.g. {example})"
            )
        urls.append(text)
    return tuple(urls)


def forward_urls(value: Value) -> tuple[str, ...]:
    """``smtp://``, ``smtps://`` or ``lmtp://`` URLs with a host and a valid port."""
    urls = _urls(value, ("smtp", "smtps", "lmtp"), "smtp://mail.example.com:25")
    for url in urls:
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise value.error(f"{url!r} has no valid port number") from None
        if not parts.hostname:
            raise value.error(f"{url!r} names no host")
    return urls


def webhook_urls(value: Value) -> tuple[str, ...]:
    return _urls(value, ("http", "https"), "https://app.example.com/mail")


def import_spec(value: Value) -> str:
    """``module:Class``."""
    text = string(value).strip()
    module, colon, attribute = text.partition(":")
    if not colon or not module or not attribute:
        raise value.error(f"{text!r} is not module:Class (e.g. myapp.handlers:Handler)")
    return text


def _names(value: Value) -> list[str]:
    """The items as DNS names: lower case, without the final dot, empty ones dropped."""
    return [name for item in _items(value) if (name := item.lower().rstrip("."))]


def domain_patterns(value: Value) -> tuple[str, ...]:
    """Domains, or ``*.domain`` for its subdomains; lower case, duplicates dropped."""
    domains: list[str] = []
    for item in _names(value):
        name = item[2:] if item.startswith("*.") else item
        if not is_host_name(name) or name.replace(".", "").isdigit():
            raise value.error(f"{item!r} is not a domain (or *.domain)")
        domains.append(item)
    return tuple(dict.fromkeys(domains))


def nameservers(value: Value) -> tuple[str, ...]:
    """Name servers as ``HOST`` or ``HOST:PORT`` (checked by mailgate.dns)."""
    # Imported here: mailgate.dns loads asyncio and dnspython, which reading flags for
    # --help or an error does not need.
    from mailgate.dns import parse_nameserver

    servers = _items(value)
    for server in servers:
        try:
            parse_nameserver(server)
        except ValueError as exc:
            raise value.error(str(exc)) from None
    return tuple(servers)


def zones(value: Value) -> tuple[str, ...]:
    """DNS zone names, lower case without the final dot."""
    names = _names(value)
    for name in names:
        if not is_host_name(name):
            raise value.error(f"{name!r} is not a DNS zone")
    return tuple(names)
