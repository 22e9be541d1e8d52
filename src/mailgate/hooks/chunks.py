"""``async for chunk in message``: the bytes of a message file in chunks, read off the event
loop. An async generator of its own module because mypyc compiles none: the objects hooks see
(``session``) may be compiled in the optional build (setup.py), this module never is."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import IO


async def file_chunks(open_file: Callable[[], IO[bytes]], size: int) -> AsyncIterator[bytes]:
    """The bytes of the file ``open_file()`` opens, ``size`` at a time; it is opened and
    read in worker threads, and closed at the end (or when the iteration is closed)."""
    loop = asyncio.get_running_loop()
    f = await loop.run_in_executor(None, open_file)
    try:
        while chunk := await loop.run_in_executor(None, f.read, size):
            yield chunk
    finally:
        f.close()


__all__ = ["file_chunks"]
