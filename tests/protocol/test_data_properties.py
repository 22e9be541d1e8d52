"""Property tests for the DATA and BDAT readers against a slow, line-by-line model."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from hypothesis import event, given, settings
from hypothesis import strategies as st

from mailgate.protocol import data as data_module
from mailgate.protocol.config import BareNewline
from mailgate.protocol.data import BdatReader, DotReader, dot_stuff
from mailgate.protocol.events import DiscardReason

# --- the model ----------------------------------------------------------------------

# REJECT's rule, stated directly: a bare CR/LF followed by ".", or a line of only "."
# ended by a bare LF or bare CR.
_REJECTED = rb"\r\.|(?<!\r)\n\.|\r\n\.(?:\n|\r(?!\n))"


@dataclass
class Expected:
    body: bytes  # what is delivered when the message is accepted
    end: int  # index in the wire just after the terminator
    error: DiscardReason | None


_PRIORITY = (DiscardReason.BARE_NEWLINE, DiscardReason.LINE_TOO_LONG, DiscardReason.TOO_BIG)


def model(
    wire: bytes, *, max_size: int | None, max_line: int | None, policy: BareNewline
) -> Expected | None:
    """The reader's rules, written the obvious way: whole message, one line at a time."""
    # The CRLF ending the DATA command counts as the first CRLF of the terminator.
    at = (b"\r\n" + wire).find(b"\r\n.\r\n")
    if at < 0:
        return None
    raw = wire[:at]  # ends with CRLF unless empty
    body = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in raw.split(b"\r\n"))
    errors = set()
    context = b"\r\n" + raw  # a bare newline is judged with the DATA line's CRLF before it
    if policy is BareNewline.REJECT and re.search(_REJECTED, context):
        errors.add(DiscardReason.BARE_NEWLINE)
    if policy is BareNewline.STRICT and re.search(rb"\r(?!\n)|(?<!\r)\n", context):
        errors.add(DiscardReason.BARE_NEWLINE)
    if policy is BareNewline.NORMALIZE:
        body = re.sub(rb"(?<!\r)\n", b"\r\n", body)
    if max_size and len(body) > max_size:
        errors.add(DiscardReason.TOO_BIG)
    if max_line is not None:
        for line in body.split(b"\n"):
            if len(line) - line.endswith(b"\r") > max_line:
                errors.add(DiscardReason.LINE_TOO_LONG)
    error = next((reason for reason in _PRIORITY if reason in errors), None)
    return Expected(body, at + 3, error)


# The reader scans slices with a handful of dots dot by dot (memchr, then the patterns at
# each), slices with few dots (or LFs) with regexes, and thick ones with bytes methods;
# short test inputs nearly always have a handful of dots and are "thick", so force each way
# as well: (_DENSE, _FEW_DOTS) pairs, a _FEW_DOTS of 0 meaning never dot by dot.
densities = st.sampled_from(
    [
        (0, 0),
        (data_module._DENSE, 0),
        (1 << 30, 0),
        (data_module._DENSE, data_module._FEW_DOTS),
        (data_module._DENSE, 1 << 30),
    ]
)


@contextmanager
def scanning(density: tuple[int, int]) -> Iterator[None]:
    saved = data_module._DENSE, data_module._FEW_DOTS
    data_module._DENSE, data_module._FEW_DOTS = density
    try:
        yield
    finally:
        data_module._DENSE, data_module._FEW_DOTS = saved


# --- driving a reader like a connection does -----------------------------------------


@dataclass
class Outcome:
    chunks: list[bytes]
    end: int | None  # absolute index in the wire, None if not done
    reader: DotReader


def pieces_of(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def drive(
    reader: DotReader,
    wire: bytes,
    cuts: list[int],
    kind: str,
    density: tuple[int, int] | None = None,
) -> Outcome:
    """Feed ``wire`` in pieces, handing back what was not consumed. ``kind`` picks the
    buffer type and whether the caller keeps junk in front of ``start``."""
    if density is not None:
        with scanning(density):
            return drive(reader, wire, cuts, kind)
    pending = b""
    offset = 0  # index in the wire of pending[0]
    chunks: list[bytes] = []
    for piece in pieces_of(wire, cuts):
        data = pending + piece
        prefix = b"X\r\n\r" if kind.endswith("offset") else b""
        buf: bytes | bytearray = prefix + data
        if kind.startswith("bytearray"):
            buf = bytearray(buf)
        got, end, done = reader.feed(buf, len(prefix))
        assert len(prefix) <= end <= len(buf)
        assert all(isinstance(c, bytes) and c for c in got)
        chunks += got
        end -= len(prefix)
        if done:
            return Outcome(chunks, offset + end, reader)
        assert len(data) - end <= 4, "withheld more than a partial terminator"
        pending = data[end:]
        offset += end
    assert offset + len(pending) == len(wire)
    return Outcome(chunks, None, reader)


def check(outcome: Outcome, expected: Expected | None, max_size: int | None = None) -> None:
    reader = outcome.reader
    data = b"".join(outcome.chunks)
    if max_size:
        assert len(data) <= max_size  # nothing past the limit is ever handed on
    if expected is None:
        assert outcome.end is None
        return
    assert outcome.end == expected.end
    assert reader.error is expected.error
    assert reader.size == len(expected.body)
    if expected.error is None:
        assert data == expected.body
        assert reader.error_reply is None
    else:
        assert expected.body.startswith(data)
        assert reader.error_reply is not None


# --- strategies ----------------------------------------------------------------------

# Bytes that matter to the reader, with enough ordinary ones to make lines.
tricky = st.binary(max_size=200).map(
    lambda b: bytes(b"\r\n.ab\r\n"[x % 7] for x in b)  # mostly CR, LF, dot
)
# Lines of chosen lengths with chosen endings: near-limit lines, bare CR and LF.
line_built = st.lists(
    st.tuples(
        st.text("a.\r", max_size=6).map(str.encode),
        st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b""]),
    ),
    max_size=12,
).map(lambda lines: b"".join(content + ending for content, ending in lines))
policies = st.sampled_from(list(BareNewline))

cuts = st.one_of(
    st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    st.just(list(range(401))),  # one byte at a time
)
kinds = st.sampled_from(["bytes", "bytearray", "bytes-offset", "bytearray-offset"])
crlf_bodies = st.lists(
    st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=8,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))
dotty_crlf_bodies = st.lists(
    st.sampled_from([b"", b".", b"..", b"...", b".a", b"a.", b"a", b"abc. def", b". "]),
    max_size=10,
).map(lambda lines: b"\r\n".join(lines))


@settings(max_examples=500, deadline=None)
@given(
    density=densities,
    wire=st.one_of(tricky, line_built, st.binary(max_size=200)),
    tail=st.sampled_from([b"", b"\r\n.\r\n", b".\r\nQUIT\r\n", b"\r\n.\r\nRSET\r\n"]),
    max_size=st.one_of(st.none(), st.integers(min_value=0, max_value=60)),
    max_line=st.one_of(st.none(), st.integers(0, 4), st.integers(0, 12)),
    policy=policies,
    cut=cuts,
    kind=kinds,
)
def test_matches_model_for_any_bytes(
    density: tuple[int, int],
    wire: bytes,
    tail: bytes,
    max_size: int | None,
    max_line: int | None,
    policy: BareNewline,
    cut: list[int],
    kind: str,
) -> None:
    wire += tail
    reader = DotReader(max_size=max_size, max_line=max_line, bare_newline=policy)
    outcome = drive(reader, wire, cut, kind, density)
    expected = model(wire, max_size=max_size, max_line=max_line, policy=policy)
    event("not done" if expected is None else f"done, error={expected.error}")
    check(outcome, expected, max_size)


@settings(max_examples=300, deadline=None)
@given(
    density=densities,
    lines=st.lists(
        st.tuples(
            st.text("ab\r", max_size=6).map(str.encode),
            st.sampled_from([b"\r\n", b"\n", b"\r", b""]),
        ),
        max_size=6,
    ),
    max_line=st.integers(0, 4),
    cut=cuts,
)
def test_line_limit_matches_model(
    density: tuple[int, int], lines: list[tuple[bytes, bytes]], max_line: int, cut: list[int]
) -> None:
    # No dots, and REJECT: the line limit is the only rule that can be broken.
    wire = b"".join(content + ending for content, ending in lines) + b"\r\n.\r\n"
    reader = DotReader(max_size=None, max_line=max_line, bare_newline=BareNewline.REJECT)
    expected = model(wire, max_size=None, max_line=max_line, policy=BareNewline.REJECT)
    event(f"error={expected and expected.error}")
    check(drive(reader, wire, cut, "bytes", density), expected)


@settings(max_examples=200, deadline=None)
@given(
    density=densities,
    body=st.one_of(crlf_bodies, dotty_crlf_bodies),
    after=st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"]),
    policy=policies,
    cut=cuts,
    kind=kinds,
)
def test_crlf_body_round_trips(
    density: tuple[int, int],
    body: bytes,
    after: bytes,
    policy: BareNewline,
    cut: list[int],
    kind: str,
) -> None:
    wire = dot_stuff(body) + after
    reader = DotReader(max_size=None, max_line=None, bare_newline=policy)
    outcome = drive(reader, wire, cut, kind, density)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    assert reader.error is None
    assert b"".join(outcome.chunks) == body
    assert outcome.end == len(wire) - len(after)


@settings(max_examples=200, deadline=None)
@given(
    density=densities,
    body=st.one_of(tricky, line_built, st.binary(max_size=200)),
    cut=cuts,
    kind=kinds,
)
def test_any_body_round_trips_unless_refused(
    density: tuple[int, int], body: bytes, cut: list[int], kind: str
) -> None:
    wire = dot_stuff(body) + b"NOOP\r\n"
    sent = body + b"\r\n" if body and not body.endswith(b"\r\n") else body
    # REJECT refuses exactly the smuggling patterns, STRICT any bare newline, NORMALIZE none.
    # Judged on the wire (stuffed) form, as the reader sees it: "\r\n..\r" is a stuffed
    # line, not a lone dot.
    data_wire = dot_stuff(body)[: -len(b".\r\n")]
    refused = {
        BareNewline.REJECT: re.search(_REJECTED, b"\r\n" + data_wire) is not None,
        BareNewline.STRICT: re.search(rb"\r(?!\n)|(?<!\r)\n", b"\r\n" + sent) is not None,
        BareNewline.NORMALIZE: False,
    }
    for policy in BareNewline:
        reader = DotReader(max_size=None, max_line=None, bare_newline=policy)
        outcome = drive(reader, wire, cut, kind, density)
        assert outcome.end == len(wire) - len(b"NOOP\r\n")
        if refused[policy]:
            assert reader.error is DiscardReason.BARE_NEWLINE
        else:
            assert reader.error is None
            expected = sent
            if policy is BareNewline.NORMALIZE:
                expected = re.sub(rb"(?<!\r)\n", b"\r\n", sent)
            assert b"".join(outcome.chunks) == expected


@settings(max_examples=200, deadline=None)
@given(
    density=densities,
    data=st.binary(max_size=300),
    max_size=st.one_of(st.none(), st.integers(min_value=0, max_value=50)),
    max_line=st.one_of(st.none(), st.integers(min_value=0, max_value=20)),
    policy=policies,
    cut=cuts,
    kind=kinds,
)
def test_arbitrary_bytes_never_raise(
    density: tuple[int, int],
    data: bytes,
    max_size: int | None,
    max_line: int | None,
    policy: BareNewline,
    cut: list[int],
    kind: str,
) -> None:
    reader = DotReader(max_size=max_size, max_line=max_line, bare_newline=policy)
    outcome = drive(reader, data, cut, kind, density)
    if outcome.end is not None:
        # Once done, nothing more is consumed.
        assert reader.feed(b"more\r\n.\r\n") == ([], 0, True)


@settings(max_examples=200, deadline=None)
@given(
    payload=st.binary(max_size=300),
    after=st.binary(max_size=20),
    cut=cuts,
    bytearrays=st.booleans(),
)
def test_bdat_takes_exactly_count(
    payload: bytes, after: bytes, cut: list[int], bytearrays: bool
) -> None:
    wire = payload + after
    reader = BdatReader(len(payload))
    pending = b""
    offset = 0
    got: list[bytes] = []
    done = reader.remaining == 0
    end_at = 0 if done else None
    for piece in pieces_of(wire, cut):
        if done:
            break
        buf: bytes | bytearray = pending + piece
        if bytearrays:
            buf = bytearray(buf)
        chunk, end, done = reader.feed(buf)
        if chunk is not None:
            assert isinstance(chunk, bytes) and chunk
            got.append(chunk)
        pending = bytes(buf[end:])
        if done:
            end_at = offset + end
        offset += end
    assert b"".join(got) == payload
    assert end_at == len(payload)
    assert reader.remaining == 0
