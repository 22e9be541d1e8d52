"""Readers for message data: DATA with dot-transparency (RFC 5321 4.5.2) and BDAT chunks.

Both are fed raw received bytes and hand back message bytes in large chunks. All scanning is
done by C-level ``find``/``count``/``replace``/``rfind`` over whole received slices; no Python
code runs per line, so the cost is a handful of memchr-speed passes per feed.

Withheld tail
    :meth:`DotReader.feed` never consumes a trailing ``\\r``, ``\\r\\n``, ``\\r\\n.`` or
    ``\\r\\n.\\r`` (a possible start of the terminator). It reports them as unconsumed through
    ``end`` and the caller hands them back in front of the next received bytes, which it has to
    buffer anyway for the commands pipelined after the data. The reader itself then keeps only
    two flags between calls, and a CR is never the last byte consumed unless the byte after it
    was seen, so a CRLF is never split between two slices that are checked separately.

End of data
    Only CRLF "." CRLF ends the data; the CRLF ending the DATA command counts as the first CRLF.
    A bare CR or LF never ends anything (no SMTP smuggling): ``\\n.\\n``, ``\\n.\\r\\n``,
    ``\\r.\\r\\n``, ``\\r\\n.\\n`` are content.

Dot-unstuffing
    The first "." of a line is removed, where a line begins after CRLF (or at the start of the
    data). This holds in every :class:`BareNewline` policy: a line begun after a bare LF keeps its
    leading dot, also with ``NORMALIZE`` (which then writes that bare LF out as CRLF, so the
    delivered message shows the dot that the client sent).

Bare newline policies (a bare CR is one not followed by LF; a bare LF one not preceded by CR)
    ``REJECT``: refuse if a bare CR or bare LF is immediately followed by ".".
    ``STRICT``: refuse if there is any bare CR or bare LF.
    ``NORMALIZE``: write each bare LF as CRLF; bare CR passes unchanged. Note that a bare CR
    followed by "." is then delivered as is: relaying such a message to a receiver that
    wrongly treats a bare CR as a line end is only safe with ``REJECT`` or ``STRICT``.

Limits
    ``size`` counts delivered bytes (after unstuffing and normalizing). ``max_line`` bounds
    every delivered line, its line ending (CRLF, or a bare LF) not counted; so a stuffed dot does
    not count (RFC 5321 4.5.3.1.6). A bare CR is content and counts.

Refusal
    Once a rule is broken the reader stops returning chunks (the chunk that broke it is not
    returned either) and reads on to the real end of the data. Every rule keeps being checked,
    and when several are broken the reason reported is the most serious one, in the order
    BARE_NEWLINE, LINE_TOO_LONG, TOO_BIG. So ``error`` may still rise before the end, and once
    done it depends only on the message, never on how its bytes were split into feeds.
"""

from __future__ import annotations

from . import replies
from .config import BareNewline
from .events import DiscardReason
from .replies import Reply

__all__ = ["BdatReader", "DotReader", "dot_stuff"]

_TERMINATOR = b"\r\n.\r\n"
# Proper prefixes of the terminator, longest first: a slice ending in one is not consumed.
_PARTIAL_TERMINATORS = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")
# What a dot at the start of a line may be the beginning of, when that line is the last one.
_DOT_LINE_END = b".\r\n"

_CR = 0x0D
_LF = 0x0A
_DOT = 0x2E

_RANK = {
    DiscardReason.TOO_BIG: 1,
    DiscardReason.LINE_TOO_LONG: 2,
    DiscardReason.BARE_NEWLINE: 3,
}


def _withheld(buf: bytes | bytearray, pos: int) -> int:
    """Length of the suffix of ``buf[pos:]`` that may be the start of the terminator."""
    if buf[-1] not in b"\r\n.":
        return 0
    for partial in _PARTIAL_TERMINATORS:
        if buf.endswith(partial, pos):
            return len(partial)
    return 0


class DotReader:
    """Reads the data of one DATA command up to CRLF "." CRLF, in constant memory."""

    __slots__ = (
        "_at_line_start",
        "_bare_lf_last",
        "_done",
        "_line_len",
        "_max_line",
        "_max_size",
        "_out_cr_last",
        "_policy",
        "_rank",
        "error",
        "size",
    )

    def __init__(
        self, *, max_size: int | None, max_line: int | None, bare_newline: BareNewline
    ) -> None:
        if max_size is not None and max_size < 0:
            raise ValueError("max_size must be None or >= 0")
        if max_line is not None and max_line < 0:
            raise ValueError("max_line must be None or >= 0")
        self._max_size = max_size or 0
        self._max_line = max_line
        self._policy = bare_newline
        self._done = False
        # The DATA command line ended with CRLF: the data starts at the start of a line.
        self._at_line_start = True
        # The last consumed byte was a bare LF (a "." next would be the smuggling pattern).
        self._bare_lf_last = False
        # Bytes of the current delivered line so far, its CR included, and whether the last
        # delivered byte was a CR (a line exactly one byte over may still end in CRLF).
        self._line_len = 0
        self._out_cr_last = False
        self._rank = 0
        #: Delivered bytes so far, still counted after the size limit is passed.
        self.size = 0
        #: Why the message is refused (see the module docstring for which reason wins).
        self.error: DiscardReason | None = None

    @property
    def done(self) -> bool:
        return self._done

    @property
    def error_reply(self) -> Reply | None:
        if self.error is DiscardReason.BARE_NEWLINE:
            if self._policy is BareNewline.STRICT:
                return replies.BARE_NEWLINE_STRICT
            return replies.BARE_NEWLINE
        if self.error is DiscardReason.LINE_TOO_LONG:
            return replies.DATA_LINE_TOO_LONG
        if self.error is DiscardReason.TOO_BIG:
            return replies.MESSAGE_TOO_BIG
        return None

    def feed(self, buf: bytes | bytearray, start: int = 0) -> tuple[list[bytes], int, bool]:
        """Consume message data from ``buf[start:]``.

        Returns ``(chunks, end, done)``. ``chunks`` are delivered message bytes (never empty
        ones; none at all once the message is refused). ``buf[end:]`` was not consumed: when
        not ``done`` it is at most four bytes that may start the terminator, to be passed
        again in front of the next received bytes; when ``done`` it is what followed the
        terminator (pipelined commands). After ``done``, feed consumes nothing.
        """
        n = len(buf)
        if self._done or start >= n:
            return [], start, self._done
        pos = start
        if self._at_line_start and buf[pos] == _DOT:
            # The CRLF before this dot is already consumed, so the terminator may start here.
            if buf.startswith(_DOT_LINE_END, pos):
                self._done = True
                return [], pos + 3, True
            if n - pos < 3 and _DOT_LINE_END.startswith(buf[pos:]):
                return [], pos, False
            pos += 1  # a stuffed dot
            self._at_line_start = False
            self._bare_lf_last = False
        t = buf.find(_TERMINATOR, pos)
        if t >= 0:
            body_end = t + 2  # the CRLF that starts the terminator ends the last line
            end = t + 5
            self._done = True
        else:
            body_end = end = n - _withheld(buf, pos)
        if body_end <= pos:
            return [], end, self._done
        if type(buf) is bytes:
            raw = buf[pos:body_end]  # the whole buffer is not even copied
        else:
            with memoryview(buf) as view:
                raw = bytes(view[pos:body_end])
        chunk = self._deliver(raw)
        return ([chunk] if chunk else []), end, self._done

    def _deliver(self, raw: bytes) -> bytes | None:
        """Unstuff, check and normalize one consumed slice; the bytes to hand on, if any."""
        chunk = raw.replace(b"\r\n.", b"\r\n")
        policy = self._policy
        if self._rank < 3:
            if policy is BareNewline.REJECT:
                # Every "\n." is either a stuffed dot ("\r\n.", removed above) or a bare LF
                # before a dot; a CR before a dot is bare by definition.
                if (
                    raw.find(b"\r.") >= 0
                    or raw.count(b"\n.") != len(raw) - len(chunk)
                    or (self._bare_lf_last and raw[0] == _DOT)
                ):
                    self._fail(DiscardReason.BARE_NEWLINE)
            elif policy is BareNewline.STRICT:
                crlf = raw.count(b"\r\n")
                if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:
                    self._fail(DiscardReason.BARE_NEWLINE)
        # The slice never ends with a CR whose LF is withheld, and never starts with an LF
        # whose CR was consumed earlier: the last-byte flags are all the context needed.
        self._bare_lf_last = raw[-1] == _LF and (len(raw) < 2 or raw[-2] != _CR)
        self._at_line_start = raw.endswith(b"\r\n")
        if policy is BareNewline.NORMALIZE and chunk.count(b"\n") != chunk.count(b"\r\n"):
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self.size += len(chunk)
        if self._max_size and self.size > self._max_size:
            self._fail(DiscardReason.TOO_BIG)
        if self._max_line is not None and self._rank < 2 and not self._lines_fit(chunk):
            self._fail(DiscardReason.LINE_TOO_LONG)
        return chunk if self.error is None else None

    def _lines_fit(self, chunk: bytes) -> bool:
        """Check the line lengths of the next delivered bytes.

        Jumps a window of one longest allowed line at a time and looks for its last LF: if
        there is none the line is too long, otherwise every line ending inside the window is
        short enough (only the first can be one byte over, and then it must end in CRLF).
        Two windows cover more than one line length, so a chunk costs ~2n/max_line steps.
        """
        assert self._max_line is not None
        # Raw bytes a line may have before its LF: the limit plus the CR of a CRLF.
        width = self._max_line + 1
        n = len(chunk)
        line_start = -self._line_len  # negative: the line began in an earlier chunk
        while True:
            lo = max(line_start, 0)
            limit = line_start + width + 1
            lf = chunk.rfind(b"\n", lo, limit)
            if lf < 0:
                if limit <= n:
                    return False
                self._line_len = n - line_start
                self._out_cr_last = chunk[-1] == _CR
                return True
            if lf - line_start == width and chunk.rfind(b"\n", lo, lf) < 0:
                cr_before = chunk[lf - 1] == _CR if lf > 0 else self._out_cr_last
                if not cr_before:
                    return False
            line_start = lf + 1

    def _fail(self, reason: DiscardReason) -> None:
        rank = _RANK[reason]
        if rank > self._rank:
            self._rank = rank
            self.error = reason


class BdatReader:
    """Takes exactly ``count`` bytes of a BDAT chunk (RFC 3030); no transparency, no limits
    (the caller counts the size of the whole message)."""

    __slots__ = ("remaining",)

    def __init__(self, count: int) -> None:
        if count < 0:
            raise ValueError("BDAT chunk size must be >= 0")
        self.remaining = count

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def feed(self, buf: bytes | bytearray, start: int = 0) -> tuple[bytes | None, int, bool]:
        """Take up to ``remaining`` bytes from ``buf[start:]``: ``(chunk or None, end, done)``;
        ``buf[end:]`` follows the chunk (the next command) once ``done``."""
        take = min(self.remaining, len(buf) - start)
        if take <= 0:
            return None, start, self.remaining == 0
        end = start + take
        if type(buf) is bytes:
            chunk = buf[start:end]  # the whole buffer is not even copied
        else:
            with memoryview(buf) as view:
                chunk = bytes(view[start:end])
        self.remaining -= take
        return chunk, end, self.remaining == 0


def dot_stuff(body: bytes) -> bytes:
    """The DATA wire form of ``body``: the bytes to send after the 354 reply, terminator
    included. Doubles the dot that starts a line (a line starts after CRLF, as in
    :class:`DotReader`) and ends the body with CRLF if it does not already; an empty body
    stays empty (the wire form is just ``.`` CRLF). ``DotReader`` gives back ``body`` (with
    that CRLF) unchanged, bare CR and LF included.
    """
    if not body:
        return _DOT_LINE_END
    wire = body.replace(b"\r\n.", b"\r\n..")
    if wire[0] == _DOT:
        wire = b"." + wire
    if not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    return wire + _DOT_LINE_END
