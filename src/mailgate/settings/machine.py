"""Defaults that depend on the machine: its name and the user's state directory."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path


def user_state_dir() -> Path:
    """Where an embedded server keeps its state by default: $XDG_STATE_HOME/mailgate, or
    ~/.local/state/mailgate (the development certificate, the spool)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mailgate"


#: The name machine_fqdn() chose and why, once it has been looked up (see machine_name_choice).
_choice: tuple[str, str] | None = None


@functools.cache
def machine_fqdn() -> str:
    """This machine's fully qualified name; looked up once, as it may query DNS.

    ``socket.getfqdn()`` returns the first name /etc/hosts gives for the host's address,
    which may be an alias such as ``localhost`` (a host named ``vm`` with ``127.0.0.1
    localhost`` first): then, or when it gives a name without a dot, the host's own name
    (``socket.gethostname()``) is the better banner. :func:`machine_name_choice` says
    which was used, for the start-up log."""
    global _choice
    hostname, fqdn = socket.gethostname(), socket.getfqdn()
    name = choose_machine_name(hostname, fqdn)
    if name == fqdn:
        _choice = (name, "socket.getfqdn()")
    else:
        _choice = (name, f"the host name; socket.getfqdn() gave {fqdn!r}")
    return name


def choose_machine_name(hostname: str, fqdn: str) -> str:
    """The better of the host's name and what the resolver calls it (see machine_fqdn)."""
    hostname, fqdn = hostname.strip(), fqdn.strip()
    if not fqdn:
        return hostname or "localhost"
    if hostname and hostname != fqdn and (_is_localhost(fqdn) or "." not in fqdn):
        return hostname
    return fqdn


def _is_localhost(name: str) -> bool:
    name = name.lower().rstrip(".")
    return name == "localhost" or name.startswith("localhost.") or name.endswith(".localhost")


def machine_name_choice() -> tuple[str, str] | None:
    """(name, where it came from) once :func:`machine_fqdn` has been looked up, else None
    (it is never looked up here)."""
    return _choice
