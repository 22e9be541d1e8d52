#!/usr/bin/env python3
"""The sans-IO protocol core's own cost per message (no driver, no sockets, no hooks):
a ServerConnection with the default ProtocolConfig fed smtp-source's shape one command
per receive_data (HELO, MAIL, RCPT, DATA, 1 KiB body and dot, QUIT), every policy point
answered with the default reply.

    PYTHONPATH=src python bench/protocol_session.py reuse 50000   # one connection
    PYTHONPATH=src python bench/protocol_session.py new 20000     # a connection per message
    PYTHONPATH=src python bench/protocol_session.py reuse 50000 --profile [SORT]

Prints CPU µs per message (process time; the best of --rounds runs, 5 by default). With
a compiled build on PYTHONPATH it measures that build. Compare two trees interleaved.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

from mailgate.protocol import NEED_DATA, PAUSED, PolicyPoint, ProtocolConfig, ServerConnection

BODY = b"".join(b"X" * 78 + b"\r\n" for _ in range(12))
HEADER = b"From: <a@x.test>\r\nTo: <postmaster>\r\nSubject: test\r\nMessage-Id: <1@x.test>\r\n\r\n"
MESSAGE = (
    b"MAIL FROM:<a@x.test>\r\n",
    b"RCPT TO:<postmaster@y.test>\r\n",
    b"DATA\r\n",
    HEADER + BODY + b".\r\n",
)


def pump(conn: ServerConnection) -> bytes:
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is PAUSED:
            break
        if isinstance(event, PolicyPoint):
            conn.respond(None)
    return conn.data_to_send()


def session(config: ProtocolConfig, messages: int) -> bytes:
    conn = ServerConnection(config, client_ip="127.0.0.1")
    pump(conn)
    conn.receive_data(b"HELO client.test\r\n")
    pump(conn)
    last = b""
    for _ in range(messages):
        for line in MESSAGE:
            conn.receive_data(line)
            last = pump(conn)
    conn.receive_data(b"QUIT\r\n")
    pump(conn)
    return last


def run(mode: str, count: int, config: ProtocolConfig) -> float:
    started = time.process_time()
    if mode == "reuse":
        assert session(config, count).startswith(b"250 ")
    else:
        for _ in range(count):
            session(config, 1)
    return 1e6 * (time.process_time() - started) / count


def main() -> None:
    args = sys.argv[1:]
    mode = args[0] if args else "reuse"
    if mode not in ("reuse", "new"):
        raise SystemExit("usage: protocol_session.py reuse|new [COUNT] [--profile [SORT]]")
    count = int(args[1]) if len(args) > 1 and args[1].isdigit() else 50000
    rounds = 5
    if "--rounds" in args:
        rounds = int(args[args.index("--rounds") + 1])
    config = ProtocolConfig(hostname="mx.test")
    session(config, 500)  # warm-up
    if "--profile" in args:
        rest = args[args.index("--profile") + 1 :]
        profiler = cProfile.Profile()
        profiler.enable()
        run(mode, count, config)
        profiler.disable()
        pstats.Stats(profiler).sort_stats(rest[0] if rest else "tottime").print_stats(30)
        return
    results = sorted(run(mode, count, config) for _ in range(rounds))
    print(
        f"{mode}: best {results[0]:.2f} median {results[len(results) // 2]:.2f} us/msg CPU"
        f" ({rounds} rounds of {count})"
    )


if __name__ == "__main__":
    main()
