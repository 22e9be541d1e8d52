"""Drive a ServerConnection with arbitrary input and check its invariants.

Shared by the hypothesis property tests and the ``fuzz/fuzz_protocol.py`` entry point, so
the fuzzer and the test suite check exactly the same things.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from .config import ProtocolConfig
from .connection import ServerConnection
from .events import NEED_DATA, PAUSED, ConnectionClosed, DataChunk, Event, PolicyPoint
from .replies import Reply
from .rules import State

_REPLY_LINE = re.compile(rb"\d{3}[ -][^\r\n]*\r\n")
_REFUSE = Reply(550, "5.7.1", ("refused by fuzz policy",))

#: Configurations that together switch on every code path.
FUZZ_CONFIGS = (
    ProtocolConfig(hostname="mx.fuzz"),
    ProtocolConfig(
        hostname="mx.fuzz",
        starttls=True,
        auth_mechanisms=("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"),
        auth_requires_tls=False,
        xclient=True,
        xforward=True,
        max_message_size=64,
        max_recipients=2,
        max_command_line=80,
        max_data_line=40,
        max_unknown_commands=3,
        max_bad_commands=5,
    ),
    ProtocolConfig(hostname="mx.fuzz", lmtp=True, chunking=False),
)


class InvariantError(AssertionError):
    """The connection broke one of its documented promises."""


def run_session(
    pieces: Sequence[bytes],
    config: ProtocolConfig,
    choose: Callable[[PolicyPoint], bool],
    *,
    peer_trusted: bool = True,
) -> tuple[bytes, list[Event]]:
    """Feed ``pieces``; answer each policy point with the default (choose → True) or a
    refusal. Returns all output and events. Raises InvariantError on a broken promise; any
    other exception escaping is a bug in the connection."""
    conn = ServerConnection(config, peer_trusted=peer_trusted)
    output = bytearray()
    events: list[Event] = []

    def pump() -> None:
        for _ in range(100_000):  # bounded: a connection never produces endless events
            event = conn.next_event()
            if event is NEED_DATA:
                break
            if event is PAUSED:
                raise InvariantError("PAUSED although every policy point was answered")
            events.append(event)
            if isinstance(event, PolicyPoint):
                if choose(event):
                    conn.respond(None)
                else:
                    conn.respond(_REFUSE)
            if conn.state is State.TLS_PENDING:
                conn.tls_established()
        else:
            raise InvariantError("event loop did not settle")
        output.extend(conn.data_to_send())

    pump()
    for piece in pieces:
        if conn.state is State.CLOSED:
            break
        conn.receive_data(piece)
        pump()
    conn.receive_data(b"")
    pump()
    _check(bytes(output), events, conn)
    return bytes(output), events


def _check(output: bytes, events: list[Event], conn: ServerConnection) -> None:
    # Every byte written is part of a well-formed reply line.
    pos = 0
    while pos < len(output):
        match = _REPLY_LINE.match(output, pos)
        if match is None:
            raise InvariantError(f"malformed output at {pos}: {output[pos : pos + 60]!r}")
        pos = match.end()
    closed = [e for e in events if isinstance(e, ConnectionClosed)]
    if len(closed) != 1 or events[-1] is not closed[0]:
        raise InvariantError("the session must end with exactly one ConnectionClosed")
    if conn.state is not State.CLOSED:
        raise InvariantError(f"state after EOF is {conn.state}")
    if any(isinstance(e, DataChunk) and not e.data for e in events):
        raise InvariantError("empty DataChunk")
