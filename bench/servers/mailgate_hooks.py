"""mailgate embedded from code with three no-op plugins and one middleware, for the
extension-API overhead benchmark (``bench/run.py --servers mailgate,mailgate-hooks``).

Every plugin has a step at helo, mail, rcpt and data_start (and message, with --maildir),
and the middleware wraps every stage, so each SMTP command of a session goes through the
hook machinery: the worst case for overhead, not a typical configuration.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mailgate import Server


class NoOp:
    def __init__(self, name: str) -> None:
        self.name = name

    async def on_helo(self, session: Any, hostname: str) -> None:
        return None

    async def on_mail(self, session: Any, envelope: Any, address: Any) -> None:
        return None

    async def on_rcpt(self, session: Any, envelope: Any, address: Any) -> None:
        return None

    async def on_data_start(self, session: Any, envelope: Any) -> None:
        return None


class NoOpWithMessage(NoOp):
    async def on_message(self, session: Any, envelope: Any, message: Any) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--maildir", help="deliver into this Maildir (default: sink)")
    parser.add_argument("--max-size", default="256M")
    parser.add_argument("--max-clients", default="2000")
    parser.add_argument("--state-dir", default=".mailgate")
    args = parser.parse_args()

    settings: dict[str, Any] = {
        "listen": args.listen,
        "hostname": "bench",
        "quiet": True,
        "max_size": args.max_size,
        "max_clients": args.max_clients,
        "max_clients_per_ip": args.max_clients,
        "state_dir": args.state_dir,
    }
    if args.maildir:
        settings["maildir"] = args.maildir
    server = Server(**settings)
    # A message step makes the server spool every message (a hook may read it); without a
    # Maildir that is a cost the bare sink never pays, so the sink run leaves it out.
    plugin = NoOpWithMessage if args.maildir else NoOp
    server.add_plugin(plugin("first"))
    server.add_plugin(plugin("second"))
    server.add_plugin(plugin("third"), before="second")
    timings: dict[str, float] = {}

    @server.use
    async def timing(ctx: Any, call_next: Any) -> Any:
        started = time.perf_counter()
        try:
            return await call_next()
        finally:
            timings[ctx.stage] = timings.get(ctx.stage, 0.0) + time.perf_counter() - started

    raise SystemExit(server.run())


if __name__ == "__main__":
    main()
