"""Where a client sends mail when it does not look up MX hosts: a smarthost URL.

``smtp://host[:port]`` (port 25), ``smtps://host[:port]`` (implicit TLS, port 465) and
``lmtp://host[:port]`` (port 24), with ``user:password@`` and the query options
``starttls=auto|require|no`` and ``cafile=PATH`` (and ``tls=LEVEL``, for callers that
name the levels they know).
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_PORTS",
    "STARTTLS_MODES",
    "TLS_LEVELS",
    "SmartHost",
    "display_host",
    "parse_url",
    "redact",
]

DEFAULT_PORTS: Final = {"smtp": 25, "smtps": 465, "lmtp": 24}
STARTTLS_MODES: Final = ("auto", "require", "no")
#: The TLS policy levels of outbound delivery (``mailgate.queue.outbound.tlspolicy``),
#: here so that routing (a peer of the queue) can check a route's ``tls`` too.
TLS_LEVELS: Final = ("none", "may", "encrypt", "verify", "dane", "dane-only", "mta-sts")


@dataclass(frozen=True, slots=True)
class SmartHost:
    """A parsed smarthost URL. ``starttls`` is ``"no"`` for ``smtps`` (TLS from the
    start); ``password`` is None when the URL gave none."""

    scheme: str
    host: str
    port: int
    username: str | None
    password: str | None
    starttls: str
    cafile: str | None
    #: ``?tls=`` (a TLS policy level of the caller's), None when not given.
    tls: str | None = None


def redact(url: str) -> str:
    """The URL as error messages and logs show it: never the password."""
    return re.sub(r"(//[^/@?#]*?:)[^/@?#]*@", r"\1***@", url)


def parse_url(url: str, *, tls_levels: tuple[str, ...] = ()) -> SmartHost:
    """The parts of a forward URL; ValueError (one line) for anything unusable.
    ``tls_levels``: the values ``?tls=`` may have (none: the option is unknown)."""
    raw, url = url, redact(url)  # ``url`` from here on is what messages show
    try:
        parts = urllib.parse.urlsplit(raw.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"forward URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"forward URL {url!r}: use smtp://, smtps:// or lmtp://")
    if not parts.hostname:
        raise ValueError(f"forward URL {url!r} names no host")
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"forward URL {url!r}: no path or fragment allowed")
    options: dict[str, str] = {}
    known = ("starttls", "cafile", "tls") if tls_levels else ("starttls", "cafile")
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key not in known:
            raise ValueError(f"forward URL {url!r}: unknown option {key!r} ({', '.join(known)})")
        options[key] = value
    tls = options.get("tls")
    if tls is not None:
        tls = tls.lower()
        if tls not in tls_levels:
            raise ValueError(f"forward URL {url!r}: tls must be one of {', '.join(tls_levels)}")
        if scheme == "smtps" and tls in ("none", "may"):
            raise ValueError(f"forward URL {url!r}: smtps:// is TLS already; tls={tls} cannot be")
    starttls = options.get("starttls", "auto").lower()
    if starttls not in STARTTLS_MODES:
        raise ValueError(f"forward URL {url!r}: starttls must be auto, require or no")
    if scheme == "smtps" and "starttls" in options:
        raise ValueError(f"forward URL {url!r}: smtps:// is TLS already; drop starttls=")
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if password is not None and username is None:
        raise ValueError(f"forward URL {url!r}: a password needs a user name")
    return SmartHost(
        scheme=scheme,
        host=parts.hostname,
        port=port if port is not None else DEFAULT_PORTS[scheme],
        username=username,
        password=password,
        starttls="no" if scheme == "smtps" else starttls,
        cafile=options.get("cafile") or None,
        tls=tls,
    )


def display_host(host: str) -> str:
    """``host`` as it stands before ``:port``: an IPv6 address in brackets."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host
