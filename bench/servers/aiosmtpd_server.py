"""aiosmtpd as the benchmark runs it: a sink that answers 250 without keeping anything, or
aiosmtpd's stock Maildir handler (``aiosmtpd.handlers.Mailbox``, which does not fsync).

Run with the bench venv's Python: ``bench/.work/venv/bin/python bench/servers/aiosmtpd_server.py
--port 2525 --mode sink``. Stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import SMTP


class Sink:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=("sink", "maildir"), default="sink")
    parser.add_argument("--maildir", help="Maildir directory (mode maildir)")
    # aiosmtpd's default limit is 32 MiB; the memory benchmark sends 100 MB.
    parser.add_argument("--max-size", type=int, default=256 * 1024 * 1024)
    args = parser.parse_args()
    if args.mode == "maildir" and not args.maildir:
        parser.error("--mode maildir needs --maildir")

    handler: Any = Sink() if args.mode == "sink" else Mailbox(args.maildir)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    def factory() -> SMTP:
        # A fixed hostname: aiosmtpd otherwise calls socket.getfqdn(), a DNS lookup.
        return SMTP(handler, hostname="bench", data_size_limit=args.max_size, loop=loop)

    server = loop.run_until_complete(loop.create_server(factory, args.host, args.port))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()


if __name__ == "__main__":
    main()
