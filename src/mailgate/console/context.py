"""What the console's request handlers see of it (a leaf of the package: the handler
modules import this, never :mod:`.service`, which imports them)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from aiohttp import web

if TYPE_CHECKING:
    from mailgate.delivery.capture import CapturedMessages
    from mailgate.queue import QueueStore
    from mailgate.server.app import SMTPServer

__all__ = ["CONSOLE_KEY", "USER_KEY", "ConsoleSources", "ConsoleState", "Submit"]


class Submit(Protocol):
    """Queues a message for delivery onward (``QueuePlugin.submit``): each recipient
    routed by the server's rules as mail from the operator ``submitter``; returns the
    queue id once the message is durable, raises ``QueueError`` (a recipient the rules
    do not send onward, a queue that cannot be written)."""

    async def __call__(
        self,
        sender: str,
        recipients: Sequence[str],
        body: Path,
        *,
        submitter: str,
        listener: str = ...,
    ) -> str: ...


@dataclass(frozen=True, slots=True)
class ConsoleSources:
    """What the console shows besides the server's own counters: a queue store (metrics
    and the queue API), the data directory of a honeypot's capture store (metrics and
    the honeypot API; read through read-only connections, like ``mailgate honeypot
    report``) and capture mode's message store (the messages API)."""

    queue: QueueStore | None = None
    honeypot_dir: Path | None = None
    #: Capture mode's store (``--capture DIR``): the messages API.
    capture: CapturedMessages | None = None
    #: How a captured message is released to an address: the queue's submit, when the
    #: server sends mail onward (``[[routes]]``); None: releasing is not offered.
    submit: Submit | None = None


class ConsoleState(Protocol):
    """The console as its handlers use it (:class:`.service.Console` is one)."""

    @property
    def server(self) -> SMTPServer: ...

    @property
    def sources(self) -> ConsoleSources: ...

    @property
    def closing(self) -> asyncio.Event:
        """Set when the console stops: long-lived responses (event streams) end."""

    async def counters(self) -> dict[str, Any]:
        """The counters to show (summed over the workers when there are several)."""
        ...


#: The key of the aiohttp application under which the handlers find the console.
CONSOLE_KEY: Final = web.AppKey["ConsoleState"]("console")
#: The key of a request under which the console's guard leaves who made it: the users
#: file's user name, ``token`` for the bearer token, ``loopback`` without credentials.
USER_KEY: Final = web.RequestKey[str]("user")
