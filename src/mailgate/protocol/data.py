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

import re

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

# A dot after CRLF on a line of its own: the end of the data.
_TERMINATOR_RE = re.compile(re.escape(_TERMINATOR))
# The end of data, or a dot right after a bare CR or bare LF (REJECT), whichever comes first.
# Starting with the literal dot lets the regex engine skip ahead at C speed, which is faster
# than several bytes.find passes.
_END_OR_SMUGGLING_RE = re.compile(rb"\.(?:(?<=\r\n\.)(?=\r\n)|(?<=\r\.)|(?<=[^\r]\n\.))")
_STUFFED_DOT_RE = re.compile(rb"\r\n\.")
_BARE_LF_RE = re.compile(rb"\n(?<!\r\n)")

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
        "_at_start",
        "_bare_lf_last",
        "_done",
        "_line_len",
        "_max_line",
        "_max_size",
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
        # Nothing consumed yet. The DATA command line ended with CRLF, so a dot here starts a
        # line. Later, a consumed CRLF is always followed by a withheld CR, never by a dot.
        self._at_start = True
        # The last consumed byte was a bare LF (a "." next would be the smuggling pattern).
        self._bare_lf_last = False
        # Bytes of the current delivered line so far (a CR that may start its CRLF included).
        self._line_len = 0
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
        if self._at_start and buf[pos] == _DOT:
            # The CRLF before this dot is already consumed, so the terminator may start here.
            if buf.startswith(_DOT_LINE_END, pos):
                self._done = True
                return [], pos + 3, True
            if n - pos < 3 and _DOT_LINE_END.startswith(buf[pos:]):
                return [], pos, False
            pos += 1  # a stuffed dot
        with memoryview(buf) as whole, whole[pos:] as view:
            # Scanning a slice rather than buf from pos keeps look-behinds from seeing bytes
            # before pos; what precedes the slice is known from the flags instead.
            t = self._find_end(view)
            if t >= 0:
                size = t + 2  # the CRLF that starts the terminator ends the last line
                end = pos + t + 5
                self._done = True
            else:
                size = n - pos - _withheld(buf, pos)
                end = pos + size
            if size <= 0:
                return [], end, self._done
            self._at_start = False
            with view[:size] as raw:
                chunk = self._deliver(raw)
        return ([chunk] if chunk else []), end, self._done

    def _find_end(self, view: memoryview) -> int:
        """Index in ``view`` of the terminator, or -1; also checks the REJECT policy on the
        bytes before it, in the same pass."""
        if self._policy is not BareNewline.REJECT or self._rank == 3:
            m = _TERMINATOR_RE.search(view)
            return -1 if m is None else m.start()
        if (self._bare_lf_last and view[0] == _DOT) or (
            view[0] == _LF and len(view) > 1 and view[1] == _DOT
        ):
            # A bare LF just before the slice or at its start (what precedes the slice is
            # never a CR whose LF is in it).
            self._fail(DiscardReason.BARE_NEWLINE)
            return self._find_end(view)
        m = _END_OR_SMUGGLING_RE.search(view)
        if m is None:
            return -1
        dot = m.start()
        # Every branch looks behind the dot; after an LF only the terminator's follows a CR.
        if view[dot - 1] == _LF and view[dot - 2] == _CR:
            return dot - 2
        self._fail(DiscardReason.BARE_NEWLINE)
        m = _TERMINATOR_RE.search(view, dot)
        return -1 if m is None else m.start()

    def _deliver(self, raw: memoryview) -> bytes | None:
        """Unstuff, check and normalize one consumed slice; the bytes to hand on, if any."""
        chunk = _STUFFED_DOT_RE.sub(b"\r\n", raw)
        # The slice never ends with a CR whose LF is withheld, and never starts with an LF
        # whose CR was consumed earlier, so a CRLF is never split between two slices and
        # these flags are all the context the next slice needs.
        last = raw[-1]
        self._bare_lf_last = last == _LF and (len(raw) < 2 or raw[-2] != _CR)
        policy = self._policy
        if policy is BareNewline.STRICT:
            # Unstuffing removed only dots; with no bare LF, #LF == #CRLF, and then
            # #CR == #LF means no bare CR either.
            if self._rank < 3 and (
                chunk.count(b"\r") != chunk.count(b"\n") or _BARE_LF_RE.search(chunk)
            ):
                self._fail(DiscardReason.BARE_NEWLINE)
        elif policy is BareNewline.NORMALIZE and _BARE_LF_RE.search(chunk):
            chunk = _BARE_LF_RE.sub(b"\r\n", chunk)
        self.size += len(chunk)
        if self._max_size and self.size > self._max_size:
            self._fail(DiscardReason.TOO_BIG)
        max_line = self._max_line
        if max_line is not None and self._rank < 2 and not self._lines_fit(chunk, max_line):
            self._fail(DiscardReason.LINE_TOO_LONG)
        return chunk if self.error is None else None

    def _lines_fit(self, chunk: bytes, max_line: int) -> bool:
        """Check the line lengths of the next delivered bytes.

        Jumps a window of one longest allowed line at a time and looks for its last LF: if
        there is none the line is too long, otherwise every line ending inside the window is
        short enough (only the first can be one byte over, and then it must end in CRLF).
        The next window starts after that LF, past which the previous window had none, so
        every two steps advance more than a line length: ~2n/max_line steps per chunk.
        """
        # Raw bytes a line may have before its LF: the limit plus the CR of a CRLF.
        width = max_line + 1
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
                return True
            # Only the first line in the window can be one byte over; it must end in CRLF.
            # (An LF opening a chunk never follows a CR: chunks do not split CRLF.)
            if (
                lf - line_start == width
                and chunk.rfind(b"\n", lo, lf) < 0
                and (lf == 0 or chunk[lf - 1] != _CR)
            ):
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
