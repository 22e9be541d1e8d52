"""A honeypot auth backend: record every AUTH attempt, then refuse it or let it in.

Each attempt becomes one JSON object on one line of ``STATE_DIR/auth-captures.jsonl``:
time, session id, peer address, HELO name, TLS, mechanism, user name, and what the
client proved itself with -- the password (PLAIN, LOGIN), the bearer token (XOAUTH2), or
the challenge and digest (CRAM-MD5, enough to test guesses offline). The file is created
with mode 0600, since it holds passwords.

Each line goes to the file with a single ``write`` on a descriptor opened with
``O_APPEND``, in a worker thread: lines are never split or interleaved, even when several
server processes (``--workers``) share the file. The file is opened for each line, so
log rotation by renaming needs no signal. Lines are not fsynced one by one; a crash may
lose the last few.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from mailgate.hooks import Accept, AuthAttempt, HookError, Reject, Session

log = logging.getLogger("mailgate.plugins.capture")

MODES: Final = ("refuse", "accept", "accept-after")
FILENAME: Final = "auth-captures.jsonl"


class CaptureError(HookError, ValueError):
    """The capture backend is misconfigured or cannot open its file (one line)."""


class AuthCapture:
    """The ``auth-capture`` backend (``auth_capture = "refuse" | "accept"``).

    ``mode``: ``"refuse"`` answers every attempt with 535 5.7.8; ``"accept"`` lets every
    attempt in as the user it names; ``"accept-after"`` refuses the first
    ``accept_after - 1`` attempts of a session and accepts the next (the server closes
    the connection after ``max_auth_failures`` failures, so keep ``accept_after`` at
    or below it).
    """

    name = "auth-capture"
    #: Nothing is checked, so every mechanism can be offered.
    auth_mechanisms = ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2")

    def __init__(
        self,
        mode: str,
        state_dir: str | os.PathLike[str],
        *,
        accept_after: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise CaptureError(f"auth capture mode must be one of {', '.join(MODES)}, not {mode!r}")
        if mode == "accept-after":
            if not isinstance(accept_after, int) or accept_after < 1:
                raise CaptureError("auth capture mode accept-after needs accept_after=N, N >= 1")
        elif accept_after is not None:
            raise CaptureError(f"accept_after is only for mode accept-after, not {mode!r}")
        self.mode = mode
        self.accept_after = accept_after
        self.path = Path(state_dir) / FILENAME
        self._write_lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Opened once now, so a directory that cannot be written is a start-up error
            # rather than a failure at the first attempt.
            os.close(self._open())
        except OSError as exc:
            raise CaptureError(
                f"cannot open the auth capture file {self.path}: {exc.strerror or exc}"
            ) from None

    async def on_auth(self, session: Session, auth: AuthAttempt) -> Accept:
        notes = session.notes.setdefault(self.name, {"attempts": 0})
        notes["attempts"] += 1
        accepted = self._accepts(notes["attempts"])
        record = self.record(session, auth, attempt=notes["attempts"], accepted=accepted)
        line = (json.dumps(record, ensure_ascii=True) + "\n").encode("ascii")
        await asyncio.get_running_loop().run_in_executor(None, self._append, line)
        log.info(
            "session %s: captured AUTH %s for %r from %s (attempt %d, %s)",
            session.id,
            auth.method,
            auth.username,
            session.peer_host,
            notes["attempts"],
            "accepted" if accepted else "refused",
        )
        if accepted:
            return Accept()
        raise Reject(535, "Authentication credentials invalid", enhanced="5.7.8")

    def _accepts(self, attempt: int) -> bool:
        if self.mode == "accept":
            return True
        if self.mode == "accept-after":
            assert self.accept_after is not None
            return attempt >= self.accept_after
        return False

    @staticmethod
    def record(
        session: Session, auth: AuthAttempt, *, attempt: int, accepted: bool
    ) -> dict[str, Any]:
        """The JSON object written for one attempt."""
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "session": session.id,
            "peer_ip": session.peer_host,
            "peer_port": session.peer_port,
            "helo": session.helo,
            "tls": session.tls is not None,
            "mechanism": auth.method,
            "username": auth.username,
            "authzid": auth.authzid,
            "attempt": attempt,
            "result": "accepted" if accepted else "refused",
        }
        if auth.password is not None:
            record["password"] = auth.password
        if auth.token is not None:
            record["token"] = auth.token
        if auth.challenge is not None:
            record["challenge"] = auth.challenge.decode("utf-8", "backslashreplace")
            record["digest"] = auth.digest
        return record

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _append(self, line: bytes) -> None:
        """One ``write`` per line (O_APPEND): whole lines even with several writers.
        Opened for each line, so a log rotation that renames the file is followed."""
        with self._write_lock:
            fd = self._open()
            try:
                view = memoryview(line)
                while view:  # a regular file takes it in one go; this is for the odd case
                    written = os.write(fd, view)
                    view = view[written:]
            finally:
                os.close(fd)


__all__ = ["FILENAME", "MODES", "AuthCapture", "CaptureError"]
