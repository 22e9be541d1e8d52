"""aiosmtpd-style handlers that the adapter's tests load by name (``module:Class``), from
the ``aiosmtpd_handler`` setting and from ``mailgate serve --aiosmtpd-handler``.

They follow aiosmtpd's documented handler API and import nothing from mailgate: they are
what a user would bring over from an aiosmtpd project.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class Collector:
    """Keeps every message it is given, in memory."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            {
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "content": envelope.content,
                "host_name": session.host_name,
            }
        )
        return "250 Message accepted for delivery"


class LocalOnlyToDirectory:
    """Refuses recipients outside example.com and writes each message as JSON into the
    directory named on the command line (aiosmtpd's ``from_cli`` convention)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.count = 0

    @classmethod
    def from_cli(cls, parser: Any, *args: str) -> LocalOnlyToDirectory:
        if len(args) != 1:
            parser.error("LocalOnlyToDirectory needs exactly one directory")
        return cls(args[0])

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if not address.endswith("@example.com"):
            return "550 not relaying to that domain"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "content": envelope.content.decode("utf-8"),
        }
        (self.directory / f"{self.count}.json").write_text(json.dumps(record))
        return "250 OK"


def not_a_handler() -> None:
    """A function: naming it as a handler is a mistake the loader reports."""


class NeedsArguments:
    """A class whose constructor needs an argument and that has no from_cli."""

    def __init__(self, where: str) -> None:
        self.where = where

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


#: An instance: load_handler uses it as it is.
shared_collector = Collector()
