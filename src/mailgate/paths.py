"""Where mailgate keeps files when nobody said where: a leaf module (it imports nothing of
mailgate), so that the composition layer (an embedded server's default ``state_dir``) and
a plugin built in code (the greylisting database) agree on one place without the plugin
importing the configuration reader."""

from __future__ import annotations

import os
from pathlib import Path


def user_state_dir() -> Path:
    """Where an embedded server keeps its state by default: $XDG_STATE_HOME/mailgate, or
    ~/.local/state/mailgate (the development certificate, the spool)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mailgate"


__all__ = ["user_state_dir"]
