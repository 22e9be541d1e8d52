"""Readers for message data: DATA with dot-transparency (RFC 5321 4.5.2) and BDAT chunks.

Both take raw received bytes and hand back message bytes in large chunks, one per feed, in
constant memory. No Python code runs per line: each received slice gets a few C-level passes
(bytes.count, precompiled regular expressions, bytes.replace, bytes.rfind).

Scanning
    The terminator, unstuffing and the REJECT rule are all about dots, so a slice is first
    counted for dots. With none (base64 attachments) they are skipped. With few, regexes that
    begin with a literal byte (the engine skips to it in C) do the work in the fewest passes,
    but pay per candidate dot, or per LF for the bare-LF checks. With many (more than one in
    ``_DENSE`` bytes) plain bytes methods take over, which pay per byte. Measured on one core:
    ~700 MB/s for REJECT on mixed prose and base64, and no input found below ~60 MB/s (regexes
    alone fell to ~10 MB/s on a body made of dots or of bare LFs).

Withheld tail
    :meth:`DotReader.feed` never consumes a trailing ``\\r``, ``\\r\\n``, ``\\r\\n.`` or
    ``\\r\\n.\\r`` (a possible start of the terminator). It reports them as unconsumed through
    ``end``, and the caller hands them back in front of the next received bytes. This contract
    was kept over a tail held inside the reader: the caller buffers received bytes anyway (for
    the commands pipelined after the data), each chunk is then one slice of the caller's
    buffer, and the reader never glues bytes together. Between calls the reader keeps two
    flags and a line length. Since a trailing CR is always withheld, a CRLF is never split
    between two checked slices.

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
    ``REJECT``: refuse if a bare CR or bare LF is immediately followed by ".", or if a line
    holding only "." is ended by a bare CR or LF (``\r\n.\n``, ``\r\n.\r`` + not LF): both
    are what a receiver that takes a bare newline as a line end would read as end of data.
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
from typing import Final

from . import replies
from .config import BareNewline
from .events import DiscardReason
from .replies import Reply

__all__ = ["BdatReader", "DotReader", "dot_stuff"]

_TERMINATOR: Final = b"\r\n.\r\n"
# Proper prefixes of the terminator, longest first: a slice ending in one is not consumed.
_PARTIAL_TERMINATORS = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")
# The whole terminator when its CRLF is the one that ended the DATA command line.
_DOT_LINE_END: Final = b".\r\n"

# A dot after CRLF on a line of its own: the end of the data.
_TERMINATOR_RE: Final = re.compile(re.escape(_TERMINATOR))
# The end of data, or a dot right after a bare CR or bare LF (REJECT), whichever comes first.
# Starting with the literal dot lets the regex engine skip ahead at C speed, which is faster
# than several bytes.find passes.
_END_OR_SMUGGLING_RE: Final = re.compile(
    rb"\.(?:(?<=\r\n\.)(?=\r\n|\n|\r[^\n])|(?<=\r\.)|(?<=[^\r]\n\.))"
)
# REJECT's second pattern: a line holding only "." but ended by a bare LF or bare CR
# ("\r\n.\n", "\r\n.\r" + not LF), which a lenient receiver would take as end of data.
_LONE_DOT_BARE_END_RE: Final = re.compile(rb"\r\n\.(?:\n|\r[^\n])")
_STUFFED_DOT_RE: Final = re.compile(rb"\r\n\.")
_BARE_LF_RE: Final = re.compile(rb"\n(?<!\r\n)")
# A dot right after a CR or an LF: what the one-piece way of DotReader.feed must not see
# (nothing to unstuff, no earlier end, nothing REJECT refuses). One search that starts
# with its literal dot: the engine skips to each dot in C and looks one byte back, about
# 4x cheaper than two bytes.find passes for "\n." and "\r." over a 1 KiB body, and never
# worse however many dots the headers hold.
_LINE_START_DOT_RE: Final = re.compile(rb"\.(?<=[\r\n]\.)")

# Above one candidate byte (dot, LF) in this many, plain bytes methods beat the regexes.
_DENSE = 16
# Up to this many dots in a slice, each is found by memchr and the patterns are tried there
# alone: message data with few dots (generated bodies, most header blocks) is then checked
# at memchr's speed instead of the regex engine's byte-by-byte skip (~6x, 100 KB with a
# handful of dots). More dots and the per-dot Python cost would exceed what it saves.
_FEW_DOTS = 24

# Enum members as module constants: ``BareNewline.REJECT`` is a Python-level descriptor
# call in CPython 3.11 (~190 ns), a constant one global lookup (native when compiled).
_REJECT: Final = BareNewline.REJECT
_STRICT: Final = BareNewline.STRICT
_NORMALIZE: Final = BareNewline.NORMALIZE
_REASON_TOO_BIG: Final = DiscardReason.TOO_BIG
_REASON_LINE_TOO_LONG: Final = DiscardReason.LINE_TOO_LONG
_REASON_BARE_NEWLINE: Final = DiscardReason.BARE_NEWLINE

_CR: Final = 0x0D
_LF: Final = 0x0A
_DOT: Final = 0x2E

_RANK: Final = {
    _REASON_TOO_BIG: 1,
    _REASON_LINE_TOO_LONG: 2,
    _REASON_BARE_NEWLINE: 3,
}


def _few_dots(buf: bytes | bytearray, pos: int) -> list[int] | None:
    """The offsets from ``pos`` of every dot in ``buf[pos:]`` when there are at most
    ``_FEW_DOTS`` (found by memchr, which skips the bytes between far faster than the regex
    engine steps through them), else None."""
    found: list[int] = []
    dot = buf.find(b".", pos)
    while dot >= 0:
        if len(found) == _FEW_DOTS:
            return None
        found.append(dot - pos)
        dot = buf.find(b".", dot + 1)
    return found


def _unstuff_at(raw: bytes | memoryview, found: list[int]) -> bytes:
    """``raw`` without the stuffed dots among the dots at ``found`` (those after CRLF)."""
    n = len(raw)
    parts: list[bytes | memoryview] = []
    start = 0
    for dot in found:
        if dot >= n:
            break  # beyond the consumed slice (the terminator's dot, a withheld one)
        if dot >= 2 and raw[dot - 1] == _LF and raw[dot - 2] == _CR:
            parts.append(raw[start:dot])
            start = dot + 1
    if not parts:
        return raw if isinstance(raw, bytes) else bytes(raw)
    parts.append(raw[start:])
    return b"".join(parts)


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
        if self.error is _REASON_BARE_NEWLINE:
            if self._policy is _STRICT:
                return replies.BARE_NEWLINE_STRICT
            return replies.BARE_NEWLINE
        if self.error is _REASON_LINE_TOO_LONG:
            return replies.DATA_LINE_TOO_LONG
        if self.error is _REASON_TOO_BIG:
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
        if (
            self._at_start
            and self._policy is _REJECT
            and buf.endswith(_TERMINATOR, start)
            and buf[start] != _DOT
        ):
            # The whole message in one piece, ended by the terminator and nothing after
            # it (a small message is sent so): with no dot after any CR or LF before the
            # terminator there is nothing to unstuff, no earlier end and nothing REJECT
            # refuses, so it is delivered as it is after one search (_LINE_START_DOT_RE). Any
            # dot at a line start, or a limit in reach, takes the general way below.
            body_end = n - 3  # the terminator's CRLF ends the last line
            size = body_end - start
            if (
                (not self._max_size or size <= self._max_size)
                # Every line is shorter than the whole (no line began before this).
                and (self._max_line is None or size <= self._max_line)
                and _LINE_START_DOT_RE.search(buf, start, body_end) is None
            ):
                self._at_start = False
                self._done = True
                self.size = size
                if type(buf) is bytes:
                    return [buf[start:body_end]], n, True
                with memoryview(buf) as view:
                    return [bytes(view[start:body_end])], n, True
        pos = start
        if self._at_start and buf[pos] == _DOT:
            # The CRLF before this dot is already consumed, so the terminator may start here.
            if buf.startswith(_DOT_LINE_END, pos):
                self._done = True
                return [], pos + 3, True
            if n - pos < 3 and _DOT_LINE_END.startswith(buf[pos:]):
                return [], pos, False
            if self._policy is _REJECT and _LONE_DOT_BARE_END_RE.match(
                b"\r\n" + bytes(buf[pos : pos + 3])
            ):
                self._fail(_REASON_BARE_NEWLINE)
            pos += 1  # a stuffed dot
        # Every rule but the line length is about dots. With none there is nothing to do;
        # the regular expressions pay per dot, so a slice thick with dots gets the bytes
        # methods instead, which pay per byte.
        found = _few_dots(buf, pos)
        if found is None:
            dots = buf.count(b".", pos)
            dense = dots * _DENSE > n - pos
        else:
            dots = len(found)
            dense = False
        with memoryview(buf) as whole, whole[pos:] as view:
            # Scanning a slice rather than buf from pos keeps look-behinds from seeing bytes
            # before pos; what precedes the slice is known from the flags instead.
            t = self._find_end(view, dense, found) if dots else -1
            if t >= 0:
                take = t + 2  # the CRLF that starts the terminator ends the last line
                end = pos + t + 5
                self._done = True
            else:
                take = n - pos - _withheld(buf, pos)
                end = pos + take
            if take <= 0:
                return [], end, self._done
            self._at_start = False
            if type(buf) is bytes and take == n:
                chunk = self._deliver(buf, dots, dense, found)  # all of it: no copy needed
            else:
                with view[:take] as raw:
                    chunk = self._deliver(raw, dots, dense, found)
        return ([chunk] if chunk else []), end, self._done

    def _find_end(self, view: memoryview, dense: bool, found: list[int] | None) -> int:
        """Index in ``view`` of the terminator, or -1. Unless ``dense``, also checks the
        REJECT policy on the bytes before it, in the same pass. ``found``: every dot of
        the view, when there are only a few (the patterns are then tried at those alone)."""
        if dense or self._policy is not _REJECT or self._rank == 3:
            if found is None:
                m = _TERMINATOR_RE.search(view)
                return -1 if m is None else m.start()
            for dot in found:
                if dot >= 2 and _TERMINATOR_RE.match(view, dot - 2) is not None:
                    return dot - 2
            return -1
        if (self._bare_lf_last and view[0] == _DOT) or (
            view[0] == _LF and len(view) > 1 and view[1] == _DOT
        ):
            # A bare LF just before the slice or at its start (what precedes the slice is
            # never a CR whose LF is in it).
            self._fail(_REASON_BARE_NEWLINE)
            return self._find_end(view, dense, found)
        if found is None:
            m = _END_OR_SMUGGLING_RE.search(view)
        else:
            # The pattern begins with its dot: trying it at each dot in order finds what
            # search() finds, without the engine stepping through every byte between.
            m = None
            for dot in found:
                m = _END_OR_SMUGGLING_RE.match(view, dot)
                if m is not None:
                    break
        if m is None:
            return -1
        dot = m.start()
        # Every branch looks behind the dot: only the terminator has CRLF on both sides.
        if (
            view[dot - 1] == _LF
            and view[dot - 2] == _CR
            and view[dot + 1] == _CR
            and view[dot + 2] == _LF
        ):
            return dot - 2
        self._fail(_REASON_BARE_NEWLINE)
        m = _TERMINATOR_RE.search(view, dot)
        return -1 if m is None else m.start()

    def _deliver(
        self, raw: bytes | memoryview, dots: int, dense: bool, found: list[int] | None
    ) -> bytes | None:
        """Unstuff, check and normalize one consumed slice; the bytes to hand on, if any."""
        policy = self._policy
        if not dots:
            chunk = raw if isinstance(raw, bytes) else bytes(raw)
        elif found is not None:
            chunk = _unstuff_at(raw, found)
        elif not dense:
            chunk = _STUFFED_DOT_RE.sub(b"\r\n", raw)
        else:
            data = raw if isinstance(raw, bytes) else bytes(raw)
            chunk = data.replace(b"\r\n.", b"\r\n")
            # What _END_OR_SMUGGLING_RE finds otherwise: every "\n." not from a stuffed dot
            # has a bare LF (one at the very start has no CR before it); "\r." a bare CR.
            if (
                policy is _REJECT
                and self._rank < 3
                and (
                    (self._bare_lf_last and data[0] == _DOT)
                    or data.find(b"\r.") >= 0
                    or data.count(b"\n.") != len(data) - len(chunk)
                    or _LONE_DOT_BARE_END_RE.search(data) is not None
                    # A consumed slice ends in "\r\n.\r" only when the byte after it was
                    # seen and is not LF (else it was the terminator): the same pattern.
                    or data.endswith(b"\r\n.\r")
                )
            ):
                self._fail(_REASON_BARE_NEWLINE)
        # The slice never ends with a CR whose LF is withheld, and never starts with an LF
        # whose CR was consumed earlier, so a CRLF is never split between two slices and
        # these flags are all the context the next slice needs.
        self._bare_lf_last = raw[-1] == _LF and (len(raw) < 2 or raw[-2] != _CR)
        if policy is not _REJECT:
            # Unstuffing removed only dots, so bare newlines are the same in chunk as on the
            # wire. No bare LF means #LF == #CRLF; then #CR == #LF means no bare CR either.
            lf = chunk.count(b"\n")
            if lf * _DENSE > len(chunk):
                bare_lf = chunk.count(b"\r\n") != lf
            else:
                bare_lf = _BARE_LF_RE.search(chunk) is not None
            if policy is _NORMALIZE:
                if bare_lf:
                    chunk = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            elif self._rank < 3 and (bare_lf or chunk.count(b"\r") != lf):
                self._fail(_REASON_BARE_NEWLINE)
        self.size += len(chunk)
        if self._max_size and self.size > self._max_size:
            self._fail(_REASON_TOO_BIG)
        max_line = self._max_line
        if max_line is not None and self._rank < 2 and not self._lines_fit(chunk, max_line):
            self._fail(_REASON_LINE_TOO_LONG)
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
            # The whole buffer is not even copied (said outright: a slice of all of it is
            # the same object in CPython, not in code compiled by mypyc).
            chunk = buf if start == 0 and end == len(buf) else buf[start:end]
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
