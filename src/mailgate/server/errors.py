"""Errors the server raises when it cannot start."""

from __future__ import annotations


class StartupError(Exception):
    """The server could not start (port in use, unwritable state directory, ...).

    The message is shown to the user as one line, so it should name the problem and the
    thing concerned, e.g. ``cannot listen on 127.0.0.1:25: address already in use``.
    """
