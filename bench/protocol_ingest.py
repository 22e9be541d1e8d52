#!/usr/bin/env python3
"""How fast mailgate.protocol takes in message data (no sockets): MB/s through DATA and BDAT.

    python bench/protocol_ingest.py [--size-mb 100] [--piece-kib 64] [--rounds 5]

A realistic body (76-character lines, some starting with '.', so dot-stuffing is exercised)
is fed in pieces through a full ServerConnection session with the default ProtocolConfig
(bare newline policy REJECT, 1 MiB line limit, size limit raised to fit). Prints the median
of several rounds. Not a test: run it by hand; the machine's other load moves the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

from mailgate.protocol import NEED_DATA, DataChunk, PolicyPoint, ProtocolConfig, ServerConnection
from mailgate.protocol.data import dot_stuff


def make_body(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog; mailgate ingest benchmark text.."[:76]
    lines = []
    total = 0
    i = 0
    while total < size:
        current = (b"." + line[1:]) if i % 50 == 0 else line
        lines.append(current)
        total += len(current) + 2
        i += 1
    return b"\r\n".join(lines) + b"\r\n"


def run(wire_pieces: list[bytes], config: ProtocolConfig) -> tuple[float, int]:
    conn = ServerConnection(config)
    received = 0

    def pump() -> None:
        nonlocal received
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                return
            if type(event) is DataChunk:
                received += len(event.data)
            elif isinstance(event, PolicyPoint):
                conn.respond(None)
        conn.data_to_send()

    pump()
    conn.receive_data(b"EHLO bench\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
    pump()
    start = time.perf_counter()
    for piece in wire_pieces:
        conn.receive_data(piece)
        pump()
    elapsed = time.perf_counter() - start
    return elapsed, received


def pieces_of(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--piece-kib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    body = make_body(args.size_mb * 1_000_000)
    config = ProtocolConfig(hostname="bench", max_message_size=len(body) * 2)
    piece = args.piece_kib * 1024
    data_wire = pieces_of(b"DATA\r\n" + dot_stuff(body), piece)
    bdat_wire = []
    for chunk in pieces_of(body, 1024 * 1024):  # 1 MiB BDAT chunks, as clients typically send
        bdat_wire.append(f"BDAT {len(chunk)}\r\n".encode() + chunk)
    bdat_wire.append(b"BDAT 0 LAST\r\n")
    bdat_pieces = pieces_of(b"".join(bdat_wire), piece)

    mb = len(body) / 1e6
    print(f"body {mb:.1f} MB, fed in {args.piece_kib} KiB pieces, {args.rounds} rounds (median)")
    for name, wire in (("DATA", data_wire), ("BDAT", bdat_pieces)):
        rates = []
        for _ in range(args.rounds):
            elapsed, received = run(wire, config)
            assert received == len(body), (name, received, len(body))
            rates.append(mb / elapsed)
        print(
            f"{name:5} {statistics.median(rates):8.0f} MB/s   (min {min(rates):.0f}, max {max(rates):.0f})"
        )


if __name__ == "__main__":
    main()
