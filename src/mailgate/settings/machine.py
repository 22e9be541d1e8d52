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


@functools.cache
def machine_fqdn() -> str:
    """This machine's fully qualified name; looked up once, as it may query DNS."""
    return socket.getfqdn() or "localhost"
