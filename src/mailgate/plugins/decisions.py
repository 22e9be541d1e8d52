"""One log line and one count per policy decision: :func:`decide`, which
:mod:`mailgate.plugins.policy` re-exports with :data:`DECISIONS`.

A decision is logged on the ``mailgate.policy`` logger as one line, with the fields also
attached to the record (``extra``) so the JSON log format carries them as keys::

    session 5K2J...0001: policy dnsbl: reject (127.0.0.2 in zen.example: listed)

and counted in :data:`DECISIONS` by (policy, verdict), which applications may read.

A module of its own because relay control decides at every RCPT for another domain: the
optional compiled build compiles it with relay control (policy's other values, read from
configuration through loose constructors, stay Python).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Final

from mailgate.hooks import Session
from mailgate.hooks.logs import LogLimiter
from mailgate.server.logs import log_line

log = logging.getLogger("mailgate.policy")
_warnings = LogLimiter(burst=5, interval=60.0)

#: (policy, verdict) -> how many times. Verdicts: accept, reject, tempfail, annotate, skip,
#: error (a lookup failed and the policy let the mail through).
DECISIONS: Counter[tuple[str, str]] = Counter()
_decisions_lock = threading.Lock()  # --workers are processes, but tests run threads

#: Decisions of one session logged at their own level (INFO); later ones go to DEBUG, so a
#: client sending RCPT after RCPT cannot make the log grow with its input. Every decision
#: is still counted in DECISIONS.
DECISIONS_LOGGED_PER_SESSION: Final = 10
#: The levels decide() compares with (module attribute reads less per decision).
_DEBUG: Final = logging.DEBUG
_INFO: Final = logging.INFO
_WARNING: Final = logging.WARNING
_LOGGED = "policy.logged"  # session.notes: decisions of the session logged at INFO so far


def decide(
    session: Session, policy: str, verdict: str, why: str, level: int = logging.INFO, **fields: Any
) -> None:
    """Log and count one policy decision."""
    with _decisions_lock:
        DECISIONS[(policy, verdict)] += 1
    if level >= _WARNING:
        # A failing lookup would warn on every command: a few a minute per session.
        args, extra = _decision_line(session, policy, verdict, why, fields)
        _warnings.log(log, level, (session.id, policy, verdict), *args, extra=extra)
        return
    if level >= _INFO:
        # Past the session's share of INFO lines (relay control at every RCPT of a long
        # session), the one question is whether DEBUG is on: enabled for DEBUG is
        # enabled for INFO too.
        logged = session.notes.get(_LOGGED, 0)
        if logged >= DECISIONS_LOGGED_PER_SESSION:
            if not log.isEnabledFor(_DEBUG):
                return
            level = _DEBUG
        elif not log.isEnabledFor(level):
            return
        else:
            session.notes[_LOGGED] = logged + 1
            if logged + 1 == DECISIONS_LOGGED_PER_SESSION:
                why = f"{why}; further decisions of this session at DEBUG level"
    elif not log.isEnabledFor(level):
        return
    args, extra = _decision_line(session, policy, verdict, why, fields)
    log_line(log, level, args[0], args[1:], extra)


def _decision_line(
    session: Session, policy: str, verdict: str, why: str, fields: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The log line of a decision: its format with its arguments, and the JSON fields."""
    extra = {
        "session": session.id,
        "policy": policy,
        "verdict": verdict,
        "why": why,
        "client": session.peer_host,
        **fields,
    }
    return ("session %s: policy %s: %s (%s)", session.id, policy, verdict, why), extra


__all__ = ["DECISIONS", "DECISIONS_LOGGED_PER_SESSION", "decide"]
