"""Sending the message itself on an aiosmtplib connection, streamed from a file.

aiosmtplib's ``data()`` wants the whole message as one bytes object, and its protocol
reads one reply per command (it drops replies that arrive back to back, as LMTP's one
reply per recipient and pipelined replies do). So for the message the connection's
transport is borrowed (:func:`borrowed_transport`): :class:`BodyProtocol` stands in for
aiosmtplib's protocol, :func:`send_message` streams the file with dot-stuffing and real
flow control, and the transport goes back to aiosmtplib afterwards (for RSET or QUIT).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections import deque
from collections.abc import AsyncIterator
from typing import IO, Final, cast

import aiosmtplib
from aiosmtplib import SMTPResponse

__all__ = [
    "CHUNK_SIZE",
    "BodyProtocol",
    "MessageFile",
    "borrowed_transport",
    "dot_stuff",
    "send_message",
]

#: How much of the message is read (by a worker thread) and written at a time.
CHUNK_SIZE: Final = 256 * 1024
# A reply longer than this (all its lines) is not SMTP; stop buffering it.
_MAX_REPLY: Final = 64 * 1024


class MessageFile:
    """A message file opened for sending, its first block read in the same trip to a
    worker thread as the opening: a message of up to :data:`CHUNK_SIZE` bytes then costs
    one trip, not two (each trip wakes a thread and hands the GIL back and forth).

    :meth:`open` and :meth:`rewind` block: call them in a worker thread.
    """

    __slots__ = ("_first", "file")

    def __init__(self, file: IO[bytes], first: bytes | None = None) -> None:
        self.file = file
        self._first = first

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> MessageFile:
        file = open(path, "rb")  # noqa: SIM115  # closed by the caller (close())
        try:
            return cls(file, file.read(CHUNK_SIZE))
        except BaseException:
            file.close()
            raise

    @classmethod
    def from_bytes(cls, data: bytes) -> MessageFile:
        """A message held in memory (no thread needed to read it)."""
        file = io.BytesIO(data)
        return cls(file, file.read(CHUNK_SIZE))

    def rewind(self) -> None:
        """Back to the start, for sending the message again (the next transaction)."""
        self.file.seek(0)
        self._first = self.file.read(CHUNK_SIZE)

    def take_first(self) -> bytes | None:
        """The block read ahead (once), or None: read on from :attr:`file`."""
        first, self._first = self._first, None
        return first

    def close(self) -> None:
        self.file.close()


class BodyProtocol(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol while the message is sent: honours the
    transport's flow control and collects every complete reply, however they arrive.
    ``timeout`` bounds each wait (for the transport to take more, for a reply)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._buffer = bytearray()
        self._replies: deque[SMTPResponse] = deque()
        self._lines: list[str] = []
        self._error: Exception | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    # transport callbacks
    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1]).rstrip(b"\r\n")
            del self._buffer[: end + 1]
            self._line(line)
        if len(self._buffer) > _MAX_REPLY or sum(map(len, self._lines)) > _MAX_REPLY:
            self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
        self._wake()

    def _line(self, line: bytes) -> None:
        code = line[:3]
        if len(code) != 3 or not code.isdigit() or line[3:4] not in (b"", b" ", b"-"):
            self._fail(aiosmtplib.SMTPResponseException(-1, "Malformed SMTP response"))
            return
        self._lines.append(line[4:].strip().decode("utf-8", "replace"))
        if line[3:4] != b"-":
            self._replies.append(SMTPResponse(int(code), "\n".join(self._lines)))
            self._lines = []

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        error = aiosmtplib.SMTPServerDisconnected("Connection lost")
        error.__cause__ = exc
        self._fail(error)
        self._writable.set()

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    # what the sender awaits
    async def drain(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._writable.is_set():
            try:
                async with asyncio.timeout(self._timeout):
                    await self._writable.wait()
            except TimeoutError:
                raise aiosmtplib.SMTPTimeoutError("Timed out sending the message") from None
            if self._error is not None:
                raise self._error

    async def reply(self) -> SMTPResponse:
        deadline = self._loop.time() + self._timeout
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._wakeup = self._loop.create_future()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._wakeup
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for the reply to the message"
                ) from None
        return self._replies.popleft()


@contextlib.asynccontextmanager
async def borrowed_transport(
    smtp: aiosmtplib.SMTP, timeout: float
) -> AsyncIterator[tuple[asyncio.Transport, BodyProtocol]]:
    """The connection's transport with a :class:`BodyProtocol` installed instead of
    aiosmtplib's protocol; aiosmtplib gets it back afterwards, or the connection is
    dropped when something went wrong halfway (such a session cannot be resumed)."""
    client_protocol = smtp.protocol
    if smtp.transport is None or client_protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    transport = cast(asyncio.Transport, smtp.transport)
    receiver = BodyProtocol(asyncio.get_running_loop(), timeout)
    transport.set_protocol(receiver)
    try:
        yield transport, receiver
    except BaseException:
        if not transport.is_closing():
            transport.set_protocol(client_protocol)
            transport.abort()
        raise
    if not transport.is_closing():
        transport.set_protocol(client_protocol)


async def send_message(
    transport: asyncio.Transport,
    receiver: BodyProtocol,
    file: IO[bytes] | MessageFile,
    *,
    dot_stuffed: bool = True,
) -> None:
    """The message from ``file`` (a regular file, or a :class:`MessageFile` with its
    first block read already), in chunks read by a worker thread, honouring the
    transport's flow control (so memory stays flat whatever the size). ``dot_stuffed``:
    after DATA, dot-stuffed and ended with ``.``; otherwise (after ``BDAT n LAST``) the
    bytes as they are."""
    loop = asyncio.get_running_loop()
    first: bytes | None = None
    if isinstance(file, MessageFile):
        first = file.take_first()
        file = file.file
    before = b"\r\n"  # a message starts at the beginning of a line
    while True:
        if first is not None:
            chunk, first = first, None
        else:
            chunk = await loop.run_in_executor(None, file.read, CHUNK_SIZE)
        if not chunk:
            break
        data = dot_stuff(chunk, before) if dot_stuffed else chunk
        before = (before + chunk)[-2:]
        # A regular file gives a short read only at its end.
        if len(chunk) < CHUNK_SIZE:
            if dot_stuffed:  # the end of the message in the same write (one send)
                data += _end_of_data(before)
                dot_stuffed = False
            transport.write(data)
            break
        transport.write(data)
        await receiver.drain()
    if dot_stuffed:
        transport.write(_end_of_data(before))


def _end_of_data(before: bytes) -> bytes:
    """The line with the single dot, after a message whose last bytes were ``before``."""
    return b".\r\n" if before == b"\r\n" else b"\r\n.\r\n"


def dot_stuff(chunk: bytes, before: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency for one chunk; ``before``: the last two bytes sent."""
    out = chunk.replace(b"\r\n.", b"\r\n..")
    if chunk.startswith(b".") and before.endswith(b"\r\n"):
        out = b"." + out
    elif chunk.startswith(b"\n.") and before.endswith(b"\r"):
        out = b"\n.." + out[2:]
    return out
