"""Unit tests for the DATA (dot-transparency) and BDAT readers."""

from __future__ import annotations

import tracemalloc

import pytest

from mailgate.protocol import data as data_module
from mailgate.protocol import replies
from mailgate.protocol.config import BareNewline
from mailgate.protocol.data import BdatReader, DotReader, dot_stuff
from mailgate.protocol.events import DiscardReason

REJECT = BareNewline.REJECT
STRICT = BareNewline.STRICT
NORMALIZE = BareNewline.NORMALIZE


@pytest.fixture(autouse=True, params=["dot-by-dot", "regex", "bytes"])
def scan_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test through the three ways the reader scans a slice: dot by dot (a
    handful of dots), regular expressions (few dots or LFs) and plain bytes methods
    (slices thick with them)."""
    monkeypatch.setattr(data_module, "_FEW_DOTS", 1 << 30 if request.param == "dot-by-dot" else 0)
    monkeypatch.setattr(data_module, "_DENSE", 1 << 30 if request.param == "bytes" else 0)


def reader(
    policy: BareNewline = REJECT, *, max_size: int | None = None, max_line: int | None = None
) -> DotReader:
    return DotReader(max_size=max_size, max_line=max_line, bare_newline=policy)


def read_all(r: DotReader, *pieces: bytes) -> tuple[bytes, bytes | None]:
    """Feed pieces like a connection does: what was not consumed goes in front of the next
    piece. Returns (delivered bytes, bytes after the terminator or None if not done)."""
    out: list[bytes] = []
    pending = b""
    for i, piece in enumerate(pieces):
        buf = pending + piece
        chunks, end, done = r.feed(buf)
        assert all(chunks)
        out += chunks
        pending = buf[end:]
        if done:
            return b"".join(out), pending + b"".join(pieces[i + 1 :])
        assert len(pending) <= 4
    return b"".join(out), None


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# --- end of data -----------------------------------------------------------------------


def test_empty_message() -> None:
    r = reader()
    assert r.feed(b".\r\n") == ([], 3, True)
    assert r.size == 0
    assert r.error is None
    assert r.error_reply is None


def test_simple_message_and_pipelined_commands() -> None:
    r = reader()
    wire = b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    chunks, end, done = r.feed(wire)
    assert done
    assert b"".join(chunks) == b"Subject: hi\r\n\r\nbody\r\n"
    assert wire[end:] == b"QUIT\r\n"
    assert r.size == len(b"Subject: hi\r\n\r\nbody\r\n")


def test_start_offset_and_bytearray() -> None:
    buf = bytearray(b"DATA\r\nline\r\n.\r\nRSET\r\n")
    r = reader()
    chunks, end, done = r.feed(buf, 6)
    assert (chunks, done) == ([b"line\r\n"], True)
    assert buf[end:] == b"RSET\r\n"
    assert all(type(c) is bytes for c in chunks)


def test_message_of_one_empty_line() -> None:
    assert read_all(reader(), b"\r\n.\r\n") == (b"\r\n", b"")


@pytest.mark.parametrize("split", range(1, 12))
def test_terminator_split_anywhere(split: int) -> None:
    wire = b"abc\r\n.\r\nNOOP\r\n"
    assert read_all(reader(), wire[:split], wire[split:]) == (b"abc\r\n", b"NOOP\r\n")


def test_terminator_one_byte_at_a_time() -> None:
    wire = b".\r\n"
    assert read_all(reader(), *one_byte_at_a_time(wire)) == (b"", b"")
    wire = b"a\r\n..\r\n.\r\n"
    assert read_all(reader(), *one_byte_at_a_time(wire)) == (b"a\r\n.\r\n", b"")


@pytest.mark.parametrize(
    ("buf", "withheld", "delivered"),
    [
        (b"abc\r", b"\r", b"abc"),
        (b"abc\r\n", b"\r\n", b"abc"),
        (b"abc\r\n.", b"\r\n.", b"abc"),
        (b"abc\r\n.\r", b"\r\n.\r", b"abc"),
        (b"abc\n", b"", b"abc\n"),
        (b"abc.", b"", b"abc."),
        (b"abc\r\n.x", b"", b"abc\r\nx"),
        (b"abc\r\r", b"\r", b"abc\r"),
    ],
)
def test_withheld_tail_is_only_a_partial_terminator(
    buf: bytes, withheld: bytes, delivered: bytes
) -> None:
    chunks, end, done = reader().feed(buf)
    assert not done
    assert buf[end:] == withheld
    assert b"".join(chunks) == delivered


@pytest.mark.parametrize("start", [b".", b".\r"])
def test_dot_at_start_waits_for_more(start: bytes) -> None:
    assert reader().feed(start) == ([], 0, False)


def test_nothing_to_read() -> None:
    r = reader()
    assert r.feed(b"") == ([], 0, False)
    assert r.feed(b"abc", 3) == ([], 3, False)


def test_feed_after_done_consumes_nothing() -> None:
    r = reader()
    r.feed(b"x\r\n.\r\n")
    assert r.feed(b"MAIL FROM:<a@b>\r\n") == ([], 0, True)


@pytest.mark.parametrize(
    ("body", "wire", "expected"),
    [
        (b"no newline", b"no newline\r\n.\r\n", b"no newline\r\n"),
        (b"ends\r\n", b"ends\r\n.\r\n", b"ends\r\n"),
        (b"two\r\n\r\n", b"two\r\n\r\n.\r\n", b"two\r\n\r\n"),
        (b"bare lf\n", b"bare lf\n\r\n.\r\n", b"bare lf\n\r\n"),
        (b"bare cr\r", b"bare cr\r\r\n.\r\n", b"bare cr\r\r\n"),
        (b"dot\r\n.", b"dot\r\n..\r\n.\r\n", b"dot\r\n.\r\n"),
    ],
)
def test_message_endings(body: bytes, wire: bytes, expected: bytes) -> None:
    assert dot_stuff(body) == wire
    assert read_all(reader(), wire) == (expected, b"")
    assert read_all(reader(), *one_byte_at_a_time(wire)) == (expected, b"")


# --- dot-unstuffing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "body"),
    [
        (b"..\r\n.\r\n", b".\r\n"),  # a line of one dot
        (b"...\r\n.\r\n", b"..\r\n"),
        (b".hidden\r\n.\r\n", b"hidden\r\n"),  # leading dot on the first line
        (b"a\r\n..b\r\n.\r\n", b"a\r\n.b\r\n"),
        (b"a\r\n..\r\n..\r\n.\r\n", b"a\r\n.\r\n.\r\n"),
        (b"a.b\r\n.\r\n", b"a.b\r\n"),  # dots inside a line stay
        (b"a\r\n.\r.\r\n.\r\n", b"a\r\n\r.\r\n"),  # the dot starting a line goes, not the next
    ],
)
def test_unstuffing(wire: bytes, body: bytes) -> None:
    r = reader(NORMALIZE)  # never refuses, so every case shows its output
    assert read_all(r, wire) == (body, b"")
    r = reader(NORMALIZE)
    assert read_all(r, *one_byte_at_a_time(wire)) == (body, b"")


def test_dot_stuff() -> None:
    assert dot_stuff(b"") == b".\r\n"
    assert dot_stuff(b".") == b"..\r\n.\r\n"
    assert dot_stuff(b"a\r\n.b\r\n..\r\n") == b"a\r\n..b\r\n...\r\n.\r\n"
    # Only a dot after CRLF starts a line, as in the reader.
    assert dot_stuff(b"a\n.b") == b"a\n.b\r\n.\r\n"
    assert dot_stuff(b"a\r") == b"a\r\r\n.\r\n"


# --- smuggling: bare CR / LF never end data ----------------------------------------------

# (payload, delivered if not refused, delivered with NORMALIZE, refused by REJECT,
#  refused by STRICT)
SMUGGLING = [
    (b"\n.\n", None, b"\r\n.\r\n", True, True),
    (b"\n.\r\n", None, b"\r\n.\r\n", True, True),
    (b"\r.\r\n", None, b"\r.\r\n", True, True),
    # A line of only "." ended by a bare newline: a lenient receiver's end of data.
    (b"\r\n.\n", b"\r\n\n", b"\r\n\r\n", True, True),  # the dot starting a line goes
    (b"\r\n.\rX", b"\r\n\rX", b"\r\n\rX", True, True),
    (b"\r\n.\r.\r\n", None, b"\r\n\r.\r\n", True, True),
    (b"\n\n", b"\n\n", b"\r\n\r\n", False, True),
    (b"\r\r\n", b"\r\r\n", b"\r\r\n", False, True),
]


@pytest.mark.parametrize(
    ("payload", "delivered", "normalized", "in_reject", "in_strict"), SMUGGLING
)
@pytest.mark.parametrize("policy", list(BareNewline))
@pytest.mark.parametrize("bytewise", [False, True])
def test_bare_newline_never_ends_data(
    payload: bytes,
    delivered: bytes | None,
    normalized: bytes,
    in_reject: bool,
    in_strict: bool,
    policy: BareNewline,
    bytewise: bool,
) -> None:
    wire = b"a" + payload + b"MAIL FROM:<evil@example>\r\n.\r\nQUIT\r\n"
    pieces = one_byte_at_a_time(wire) if bytewise else [wire]
    r = reader(policy)
    got, after = read_all(r, *pieces)
    assert after == b"QUIT\r\n"  # only the real terminator ended the data
    refused = {REJECT: in_reject, STRICT: in_strict, NORMALIZE: False}[policy]
    if refused:
        assert r.error is DiscardReason.BARE_NEWLINE
        if not bytewise:  # fed at once, nothing was handed on before the refusal
            assert got == b""
    else:
        assert r.error is None
        middle = normalized if policy is NORMALIZE else delivered
        assert middle is not None
        assert got == b"a" + middle + b"MAIL FROM:<evil@example>\r\n"


def test_reject_replies() -> None:
    r = reader(REJECT)
    read_all(r, b"a\n.b\r\n.\r\n")
    assert r.error is DiscardReason.BARE_NEWLINE
    assert r.error_reply is replies.BARE_NEWLINE
    r = reader(STRICT)
    read_all(r, b"a\nb\r\n.\r\n")
    assert r.error is DiscardReason.BARE_NEWLINE
    assert r.error_reply is replies.BARE_NEWLINE_STRICT


def test_reject_allows_bare_newline_not_before_a_dot() -> None:
    r = reader(REJECT)
    assert read_all(r, b"a\nb\rc\r\n.\r\n") == (b"a\nb\rc\r\n", b"")
    assert r.error is None


@pytest.mark.parametrize(
    "pieces",
    [
        [b"a\n", b".b\r\n.\r\n"],  # bare LF ends one feed, the dot starts the next
        [b"a", b"\n.b\r\n.\r\n"],  # the feed starts with the bare LF
        [b"\n.b\r\n.\r\n"],  # a bare LF right at the start of the data
        [b"a\r", b".\r\n.\r\n"],  # bare CR withheld, then the dot
    ],
)
def test_reject_sees_pattern_across_feeds(pieces: list[bytes]) -> None:
    r = reader(REJECT)
    assert read_all(r, *pieces)[1] == b""
    assert r.error is DiscardReason.BARE_NEWLINE


def test_strict_sees_crlf_split_across_feeds_as_fine() -> None:
    r = reader(STRICT)
    assert read_all(r, b"a\r", b"\nb\r", b"\n", b"c\r\n.\r\n") == (b"a\r\nb\r\nc\r\n", b"")
    assert r.error is None


def test_normalize_keeps_dot_after_bare_lf() -> None:
    # A line begun after a bare LF is not unstuffed; its LF becomes CRLF.
    r = reader(NORMALIZE)
    assert read_all(r, b"a\n..b\r\n..c\r\n.\r\n") == (b"a\r\n..b\r\n.c\r\n", b"")
    assert r.size == len(b"a\r\n..b\r\n.c\r\n")


def test_normalize_leaves_bare_cr() -> None:
    r = reader(NORMALIZE)
    assert read_all(r, b"a\rb\n", b"c\r\n.\r\n") == (b"a\rb\r\nc\r\n", b"")


# --- size limit ------------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True])
def test_size_limit_boundaries(bytewise: bool) -> None:
    body = b"x" * 8 + b"\r\n"  # 10 bytes
    wire = dot_stuff(body) + b"QUIT\r\n"
    pieces = one_byte_at_a_time(wire) if bytewise else [wire]
    r = reader(max_size=10)
    assert read_all(r, *pieces) == (body, b"QUIT\r\n")
    assert r.error is None
    r = reader(max_size=9)
    delivered, after = read_all(r, *pieces)
    assert after == b"QUIT\r\n"
    assert r.error is DiscardReason.TOO_BIG
    assert r.error_reply is replies.MESSAGE_TOO_BIG
    assert len(delivered) <= 9
    assert r.size == 10  # still counted to the end


def test_size_counts_unstuffed_bytes() -> None:
    r = reader(max_size=5)
    read_all(r, b"..\r\n..\r\n.\r\n")
    assert r.error is DiscardReason.TOO_BIG
    r = reader(max_size=6)
    assert read_all(r, b"..\r\n..\r\n.\r\n") == (b".\r\n.\r\n", b"")
    assert r.size == 6


def test_size_counts_normalized_bytes() -> None:
    r = reader(NORMALIZE, max_size=4)
    read_all(r, b"a\nb\n\r\n.\r\n")  # delivered: a CRLF b CRLF CRLF
    assert r.size == 8
    assert r.error is DiscardReason.TOO_BIG


@pytest.mark.parametrize("unlimited", [None, 0])
def test_no_size_limit(unlimited: int | None) -> None:
    r = reader(max_size=unlimited)
    read_all(r, b"x" * 100_000 + b"\r\n.\r\n")
    assert r.error is None
    assert r.size == 100_002


def test_chunks_stop_once_over_the_limit() -> None:
    r = reader(max_size=5)
    chunks, _, _ = r.feed(b"abc\r\n")  # withholds the CRLF
    assert b"".join(chunks) == b"abc"
    chunks, _, done = r.feed(b"\r\nmore\r\n")
    assert (chunks, done) == ([], False)
    chunks, _, done = r.feed(b"\r\n" + b"even more\r\n.\r\n")
    assert (chunks, done) == ([], True)
    assert r.error is DiscardReason.TOO_BIG


# --- line length -----------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize("policy", list(BareNewline))
def test_line_limit_boundaries(bytewise: bool, policy: BareNewline) -> None:
    for length, ok in ((9, True), (10, True), (11, False)):
        wire = b"short\r\n" + b"y" * length + b"\r\nshort\r\n.\r\n"
        pieces = one_byte_at_a_time(wire) if bytewise else [wire]
        r = reader(policy, max_line=10)
        delivered, after = read_all(r, *pieces)
        assert after == b""
        if ok:
            assert r.error is None
            assert delivered == wire[:-3]
        else:
            assert r.error is DiscardReason.LINE_TOO_LONG
            assert r.error_reply is replies.DATA_LINE_TOO_LONG


@pytest.mark.parametrize("split", range(1, 40))
def test_line_limit_across_feed_boundaries(split: int) -> None:
    good = b"abcdefghij\r\n" * 3 + b".\r\n"
    bad = b"abcdefghij\r\nabcdefghijk\r\nabcdefghij\r\n.\r\n"
    for wire, error in ((good, None), (bad, DiscardReason.LINE_TOO_LONG)):
        r = reader(max_line=10)
        read_all(r, wire[:split], wire[split:])
        assert r.error is error


def test_stuffed_dot_does_not_count_towards_line_length() -> None:
    r = reader(max_line=3)
    assert read_all(r, b"....\r\n.\r\n") == (b"...\r\n", b"")


def test_bare_cr_counts_and_bare_lf_ends_a_line() -> None:
    r = reader(max_line=3)
    read_all(r, b"ab\r\rc\r\n.\r\n")  # "ab\r\rc" is 5 bytes
    assert r.error is DiscardReason.LINE_TOO_LONG
    r = reader(max_line=3)
    assert read_all(r, b"abc\nabc\r\n.\r\n") == (b"abc\nabc\r\n", b"")
    r = reader(max_line=3)
    read_all(r, b"abcd\nab\r\n.\r\n")
    assert r.error is DiscardReason.LINE_TOO_LONG


def test_line_one_over_ending_in_lf_at_the_start_of_a_feed() -> None:
    # "abc" is one over and ends in a bare LF that opens the next chunk, which itself ends
    # in a CR: that CR must not be taken for one before the LF.
    r = reader(max_line=2)
    read_all(r, b"abc", b"\nx\r\r", b"\n.\r\n")  # "abc" is over, "x\r" is not
    assert r.error is DiscardReason.LINE_TOO_LONG
    r = reader(max_line=3)
    read_all(r, b"abc", b"\nx\r\r", b"\n.\r\n")
    assert r.error is None


def test_zero_max_line_allows_only_empty_lines() -> None:
    r = reader(max_line=0)
    assert read_all(r, b"\r\n\r\n.\r\n") == (b"\r\n\r\n", b"")
    r = reader(max_line=0)
    read_all(r, b"\r\na\r\n.\r\n")
    assert r.error is DiscardReason.LINE_TOO_LONG


def test_very_long_line_is_refused_while_streaming() -> None:
    r = reader(max_line=1000)
    chunks, _, done = r.feed(b"z" * 5000)
    assert (chunks, done) == ([], False)
    assert r.error is DiscardReason.LINE_TOO_LONG


def test_many_lines_in_one_chunk() -> None:
    lines = b"".join(b"%d\r\n" % (i * 7919) for i in range(2000))
    longest = len(b"%d" % (1999 * 7919))
    r = reader(max_line=longest)
    assert read_all(r, lines + b".\r\n") == (lines, b"")
    r = reader(max_line=longest - 1)
    read_all(r, lines + b".\r\n")
    assert r.error is DiscardReason.LINE_TOO_LONG


def test_line_over_the_limit_is_refused_before_its_end_arrives() -> None:
    r = reader(max_line=3)
    assert r.feed(b"abc\r") == ([b"abc"], 3, False)  # may still end in CRLF
    r = reader(max_line=3)
    assert r.feed(b"abcd") == ([b"abcd"], 4, False)  # 4 bytes: only a CR may be the last
    r = reader(max_line=3)
    assert r.feed(b"abcde") == ([], 5, False)  # two bytes over: refused at once
    assert r.error is DiscardReason.LINE_TOO_LONG


# --- several errors --------------------------------------------------------------------


def test_most_serious_error_wins_whatever_came_first() -> None:
    # Too big first, then a long line, then smuggling: BARE_NEWLINE is reported.
    r = reader(max_size=5, max_line=20)
    read_all(r, b"0123456789\r\n", b"x" * 30 + b"\r\n", b"a\n.b\r\n.\r\n")
    assert r.error is DiscardReason.BARE_NEWLINE
    # Too big and a long line: LINE_TOO_LONG.
    r = reader(max_size=5, max_line=20)
    read_all(r, b"0123456789\r\n", b"x" * 30 + b"\r\n.\r\n")
    assert r.error is DiscardReason.LINE_TOO_LONG
    assert r.error_reply is replies.DATA_LINE_TOO_LONG


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        reader(max_size=-1)
    with pytest.raises(ValueError):
        reader(max_line=-1)
    with pytest.raises(ValueError):
        BdatReader(-1)


# --- streaming -------------------------------------------------------------------------


def test_streams_in_constant_memory() -> None:
    piece = (b"A" * 75 + b"\r\n" + b".." + b"B" * 73 + b"\r\n") * 400  # ~62 KB
    r = reader(max_size=None, max_line=1 << 20)
    total = 0
    tracemalloc.start()
    try:
        pending = b""
        for _ in range(200):  # ~12 MB
            buf = pending + piece
            chunks, end, done = r.feed(buf)
            total += sum(map(len, chunks))
            pending = buf[end:]
        chunks, end, done = r.feed(pending + b".\r\n")
        total += sum(map(len, chunks))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert done
    assert total == r.size == 200 * (len(piece) - 400)
    # A few pieces' worth at once (buffers, a chunk, unstuffing's temporaries) for 12 MB.
    assert peak < 8 * len(piece)


# --- BDAT --------------------------------------------------------------------------------


def test_bdat_exact_and_pipelined() -> None:
    r = BdatReader(5)
    assert r.feed(b"hello") == (b"hello", 5, True)
    assert r.remaining == 0
    r = BdatReader(5)
    buf = b"hello\r\n.\r\nQUIT\r\n"  # no transparency: CRLF.CRLF is command data here
    chunk, end, done = r.feed(b"he")
    assert (chunk, end, done) == (b"he", 2, False)
    chunk, end, done = r.feed(bytearray(buf[2:]))
    assert (chunk, done) == (b"llo", True)
    assert type(chunk) is bytes
    assert buf[2 + end :] == b"\r\n.\r\nQUIT\r\n"


def test_bdat_zero_and_start_offset() -> None:
    assert BdatReader(0).feed(b"QUIT\r\n") == (None, 0, True)
    r = BdatReader(3)
    assert r.feed(b"BDAT 3\r\nabcNOOP", 8) == (b"abc", 11, True)
    assert r.feed(b"more") == (None, 0, True)
    r = BdatReader(3)
    assert r.feed(b"", 0) == (None, 0, False)


def test_bdat_whole_bytes_buffer_is_not_copied() -> None:
    data = b"x" * 1000
    chunk, _, _ = BdatReader(1000).feed(data)
    assert chunk is data
