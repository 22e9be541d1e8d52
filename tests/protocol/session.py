"""A test driver for ServerConnection: feeds bytes, answers policy points, collects output."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from mailgate.protocol import (
    NEED_DATA,
    PAUSED,
    DataChunk,
    Event,
    PolicyPoint,
    ProtocolConfig,
    Reply,
    ServerConnection,
)

Answer = Callable[[PolicyPoint], Reply | list[Reply] | None]

_REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$")


@dataclass
class Session:
    conn: ServerConnection
    answer: Answer = field(default=lambda point: None)
    events: list[Event] = field(default_factory=list)
    output: bytearray = field(default_factory=bytearray)
    body: bytearray = field(default_factory=bytearray)

    @classmethod
    def start(
        cls,
        config: ProtocolConfig | None = None,
        *,
        answer: Answer | None = None,
        greet: bool = True,
        **kwargs: object,
    ) -> Session:
        conn = ServerConnection(config or ProtocolConfig(hostname="mx.test"), **kwargs)  # type: ignore[arg-type]
        session = cls(conn, answer or (lambda point: None))
        if greet:
            session.pump()
            session.take_output()
        return session

    def pump(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                break
            if event is PAUSED:
                raise AssertionError("paused without a policy point being answered")
            self.events.append(event)
            if isinstance(event, DataChunk):
                self.body += event.data
            if isinstance(event, PolicyPoint):
                self.conn.respond(self.answer(event))
        self.output += self.conn.data_to_send()

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self.pump()

    def send(self, data: bytes) -> list[tuple[int, str]]:
        """Feed ``data`` and return the replies it produced as (code, text of last line)."""
        self.feed(data)
        return self.replies()

    def cmd(self, line: str) -> int:
        """Send one command line; return the code of its (single) reply."""
        replies = self.send(line.encode("utf-8") + b"\r\n")
        assert len(replies) == 1, replies
        return replies[0][0]

    def take_output(self) -> bytes:
        out = bytes(self.output)
        self.output.clear()
        return out

    def replies(self) -> list[tuple[int, str]]:
        return parse_replies(self.take_output())


def run_with_defaults(conn: ServerConnection, data: bytes) -> tuple[bytes, bytes]:
    """Greet, feed ``data``, answer every policy point with the default: (the banner's
    output, the output after it)."""
    out = bytearray()

    def pump() -> None:
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, PolicyPoint):
                conn.respond(None)
        out.extend(conn.data_to_send())

    pump()
    banner = len(out)
    conn.receive_data(data)
    pump()
    return bytes(out[:banner]), bytes(out[banner:])


def parse_replies(data: bytes) -> list[tuple[int, str]]:
    """Split wire output into replies: (code, text of the last line)."""
    result = []
    for line in data.split(b"\r\n"):
        if not line:
            continue
        match = _REPLY_LINE.match(line)
        assert match, f"malformed reply line {line!r}"
        if match.group(2) == b" ":
            result.append((int(match.group(1)), match.group(3).decode("utf-8")))
    return result
