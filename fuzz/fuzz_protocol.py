#!/usr/bin/env python3
"""Fuzz mailgate.protocol for N iterations.

    python fuzz/fuzz_protocol.py --iterations 100000 [--seed 1] [--max-length 2048]

Without atheris: a mutation fuzzer over a corpus of real SMTP sessions (byte flips, splices,
insertions of protocol tokens, random splitting into feeds). With ``--atheris`` (pip install
atheris): coverage-guided, same checks. Each input runs under every FUZZ_CONFIG; a failure
prints the input and exits 1.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback

from mailgate.protocol._fuzz import FUZZ_CONFIGS, run_session

CORPUS = [
    b"EHLO a\r\nMAIL FROM:<a@b.example> SIZE=10 BODY=8BITMIME\r\nRCPT TO:<c@d.example> NOTIFY=SUCCESS\r\n"
    b"DATA\r\nSubject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n",
    b"EHLO a\r\nMAIL FROM:<> SMTPUTF8\r\nRCPT TO:<\xc3\xa9@d.example>\r\nBDAT 5\r\nhelloBDAT 0 LAST\r\n",
    b"EHLO a\r\nAUTH PLAIN AGEAYg==\r\nAUTH LOGIN\r\nYQ==\r\nYg==\r\nSTARTTLS\r\nEHLO b\r\n",
    b"HELO a\r\nMAIL FROM:<a@[IPv6:::1]>\r\nRCPT TO:<Postmaster>\r\nDATA\r\nx\n.\nMAIL\r\n.\r\n",
    b"LHLO a\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nRCPT TO:<z@y.example>\r\nDATA\r\nb\r\n.\r\n",
    b"XCLIENT ADDR=192.0.2.1 NAME=x.example\r\nXFORWARD PROTO=ESMTP\r\nVRFY x\r\nEXPN y\r\nHELP\r\nRSET\r\nNOOP\r\n",
    b"EHLO a\r\nAUTH CRAM-MD5\r\n*\r\nAUTH XOAUTH2 dXNlcj1hAWF1dGg9QmVhcmVyIHQBAQ==\r\n\r\n",
]
TOKENS = [
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"\r\n.\r\n",
    b"<",
    b">",
    b"\x00",
    b"\xff",
    b" ",
    b"=",
    b"BDAT 3\r\n",
    b"DATA\r\n",
    b"RCPT TO:<a@b>\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN\r\n",
]


def mutate(rng: random.Random, data: bytes, max_length: int) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        choice = rng.random()
        pos = rng.randint(0, len(buf))
        if choice < 0.3 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif choice < 0.6:
            buf[pos:pos] = rng.choice(TOKENS)
        elif choice < 0.8 and buf:
            end = min(len(buf), pos + rng.randint(1, 32))
            del buf[pos:end]
        else:
            other = rng.choice(CORPUS)
            start = rng.randrange(len(other))
            buf[pos:pos] = other[start : start + rng.randint(1, 64)]
    return bytes(buf[:max_length])


def split(rng: random.Random, data: bytes) -> list[bytes]:
    pieces, pos = [], 0
    while pos < len(data):
        step = rng.choice((1, 2, 3, 7, 64, 1024))
        pieces.append(data[pos : pos + step])
        pos += step
    return pieces


def check(data: bytes, rng: random.Random) -> None:
    pieces = split(rng, data)
    for config in FUZZ_CONFIGS:
        policy_rng = random.Random(rng.random())
        run_session(pieces, config, lambda _p, r=policy_rng: r.random() < 0.85)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--atheris", action="store_true", help="coverage-guided with atheris")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int(time.time())
    if args.atheris:
        import atheris  # type: ignore[import-not-found]

        def one(data: bytes) -> None:
            check(data[: args.max_length], random.Random(len(data)))

        atheris.Setup([sys.argv[0], f"-runs={args.iterations}"], one)
        atheris.Fuzz()
        return 0
    rng = random.Random(seed)
    start = time.monotonic()
    for i in range(args.iterations):
        data = mutate(rng, rng.choice(CORPUS), args.max_length)
        try:
            check(data, random.Random(rng.random()))
        except Exception:
            print(f"FAILED at iteration {i} (seed {seed}) on input:\n{data!r}", file=sys.stderr)
            traceback.print_exc()
            return 1
    elapsed = time.monotonic() - start
    print(
        f"{args.iterations} inputs x {len(FUZZ_CONFIGS)} configs, no failures, "
        f"{args.iterations / elapsed:.0f} inputs/s (seed {seed})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
