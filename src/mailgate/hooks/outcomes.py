"""What a hook answers with: :class:`Accept`, :class:`Reject`, :class:`TempFail`,
:class:`PerRecipient` (or an explicit :class:`~mailgate.protocol.Reply`), what a step's
return value means at a stage, and the enhanced status code a refusal gets when it names none.
Also :class:`HookError`, the error for misuse of the hooks API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from mailgate.protocol import Reply


class HookError(Exception):
    """Misuse of the hooks API: unknown stage or plugin name, a cycle in the ordering, a
    result a stage cannot use."""


class _Refusal(Exception):
    """What Reject and TempFail share: a reply code, text, enhanced status, disconnect."""

    _low = 0
    _default_code = 0
    _default_text = ""

    def __init__(
        self,
        *args: int | str,
        code: int | None = None,
        text: str | None = None,
        enhanced: str | None = None,
        disconnect: bool = False,
        status: str | None = None,  # older spelling of ``enhanced``
    ) -> None:
        # Positional: a code and/or a text, in either order -- Reject(550, "no such user"),
        # Reject("no such user"), Reject("no such user", 553).
        for arg in args:
            if isinstance(arg, int) and not isinstance(arg, bool) and code is None:
                code = arg
            elif isinstance(arg, str) and text is None:
                text = arg
            else:
                raise HookError(f"{type(self).__name__}: unexpected argument {arg!r}")
        code = self._default_code if code is None else code
        if not self._low <= code <= self._low + 99:
            raise HookError(f"{type(self).__name__} needs a {self._low // 100}xx code, not {code}")
        self.code = code
        self.text = text or self._default_text
        self.enhanced = enhanced or status
        if self.enhanced is not None and not self.enhanced.startswith(f"{code // 100}."):
            raise HookError(f"enhanced code {self.enhanced} does not match reply code {code}")
        self.disconnect = disconnect
        super().__init__(self.text)

    def reply(self, stage: str | None = None) -> Reply:
        """The reply this refusal gives at ``stage`` (its enhanced code filled in)."""
        status = self.enhanced or default_status(stage, self.code)
        # splitlines: a text from elsewhere may carry CRLF, which a reply line must not.
        return Reply(self.code, status, tuple(self.text.splitlines()))


class Reject(_Refusal):
    """Refuse with a permanent (5xx) reply: ``raise Reject(550, "no such user")``.
    ``enhanced`` defaults to a status that fits the stage; ``disconnect=True`` closes the
    connection after the reply."""

    _low = 500
    _default_code = 550
    _default_text = "Rejected"


class TempFail(_Refusal):
    """Refuse with a transient (4xx) reply: the client should try again later."""

    _low = 400
    _default_code = 451
    _default_text = "Temporary failure, try again later"


@dataclass(frozen=True, slots=True)
class Accept:
    """Answer now with success; later steps of the chain do not run. ``code`` and ``text``
    replace the stage's usual success reply (e.g. ``Accept(text="Hi there")``)."""

    code: int | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if self.code is not None and not 200 <= self.code <= 399:
            raise HookError(f"Accept needs a 2xx or 3xx code, not {self.code}")


@dataclass(frozen=True, slots=True)
class PerRecipient:
    """LMTP answers one reply per recipient: return this (or a plain list/dict) from a
    message hook. Each answer is None/True/Accept (delivered), a Reject/TempFail, or a
    Reply; a dict keyed by address leaves the others at the default."""

    answers: list[Any] | tuple[Any, ...] | dict[str, Any]


#: What a finished chain gives the server.
Outcome = Reply | Accept | _Refusal | PerRecipient | None

# RFC 3463 subjects per stage; 7.1 ("delivery not authorized") is the usual policy answer.
_STAGE_STATUS: Final = {
    "connect": "7.1",
    "tls": "7.1",
    "helo": "7.1",
    "auth": "7.8",
    "mail": "7.1",
    "rcpt": "7.1",
    "vrfy": "1.1",
    "data_start": "7.1",
    "message": "7.1",
}
_CODE_STATUS: Final = {
    421: "4.3.2",
    450: "4.2.1",
    451: "4.3.0",
    452: "4.3.1",
    454: "4.7.0",
    535: "5.7.8",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.7.1",
}


def default_status(stage: str | None, code: int) -> str:
    """The enhanced status code for a refusal that did not name one."""
    if code in _CODE_STATUS:
        return _CODE_STATUS[code]
    return f"{code // 100}.{_STAGE_STATUS.get(stage or '', '0.0')}"


#: The answer when a step fails or a chain outlives its timeout (the failure is logged).
_HOOK_FAILED = TempFail(451, "Local error in processing, try again later", enhanced="4.3.0")


def _outcome(stage: str, plugin: str, result: Any) -> Outcome:
    if result is None:
        return None
    if isinstance(result, Reply | Accept | _Refusal | PerRecipient):
        return result
    if result is True:
        return Accept()
    if result is False:
        return Reject(535, "Authentication credentials invalid") if stage == "auth" else Reject()
    if stage == "message" and isinstance(result, list | tuple | dict):
        return PerRecipient(result)
    raise HookError(
        f"{plugin} returned {result!r} at {stage}; return None, True/False, Accept or a "
        "Reply, or raise Reject/TempFail"
    )


__all__ = [
    "Accept",
    "HookError",
    "Outcome",
    "PerRecipient",
    "Reject",
    "TempFail",
    "default_status",
]
