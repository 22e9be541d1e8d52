"""The probes of issue 13 (every slot, byte and second bounded), against ``mailgate serve``
run from a source tree (uvloop, as deployed), for before/after figures:

  flood    1,100 silent SMTPS connections from one address: how many stay open, the
           server's RSS growth, and how soon a client from 127.0.0.2 gets a banner
  hello    with --idle-timeout 5: a partial ClientHello, and STARTTLS then silence
  drip     with --idle-timeout 5 --data-timeout 5: one byte every 2 s of a command line,
           and of message data
  session  NOOP every 0.5 s: when the session ends
  forward  --maildir M --forward smtp://(nothing listening), three tries: copies in M/new
  enospc   a 1.5 MB message onto a 512 KiB tmpfs (needs root and mount)
  log      about 100 KB of pipelined MAIL/RCPT/RSET: bytes of INFO log

    python3 bench/attack_probes.py SRC_DIR [--probes flood,drip] [-- EXTRA SERVE FLAGS]

SRC_DIR is the ``src`` directory of the tree to probe (another checkout for "before").
Not a test: CI never runs it.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "server"))
from harness import CLIServer

PROBES = ("flood", "hello", "drip", "session", "forward", "enospc", "log")
PARTIAL_CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
ENVELOPE = b"HELO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def read_all(sock: socket.socket) -> None:
    """Read and drop replies until the server closes."""
    while sock.recv(65536):
        pass


def is_closed(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(4096) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


class Probe:
    def __init__(self, src: Path, extra: list[str]) -> None:
        self.src = src
        self.extra = extra

    def serve(self, workdir: Path, *flags: str, smtps: bool = True) -> tuple[CLIServer, int, int]:
        plain, implicit = free_port(), free_port()
        listen = ["--listen", f"127.0.0.1:{plain}"]
        if smtps:
            listen += ["--smtps-listen", f"127.0.0.1:{implicit}"]
        args = [*listen, "--state-dir", str(workdir / "state"), "--hostname", "mx.test"]
        if "--maildir" not in flags:
            args += ["--maildir", str(workdir / "M")]
        server = CLIServer(
            [*args, *flags, *self.extra], cwd=workdir, env={"PYTHONPATH": str(self.src)}
        )
        return server.start(expected_listeners=2 if smtps else 1), plain, implicit

    def flood(self) -> str:
        server, plain, smtps = self.serve(Path(tempfile.mkdtemp()))
        try:
            time.sleep(0.5)
            before = rss_mib(server.proc.pid) if server.proc else 0.0
            silent = []
            for _ in range(1100):
                try:
                    silent.append(socket.create_connection(("127.0.0.1", smtps), timeout=5))
                except OSError:
                    break
            time.sleep(2)
            still_open = sum(not is_closed(sock, 0.01) for sock in silent)
            grown = (rss_mib(server.proc.pid) if server.proc else 0.0) - before
            started = time.monotonic()
            try:
                with socket.create_connection(
                    ("127.0.0.1", plain), timeout=40, source_address=("127.0.0.2", 0)
                ) as other:
                    banner = other.recv(100)[:12]
            except OSError as exc:
                banner = repr(exc).encode()
            waited = time.monotonic() - started
            for sock in silent:
                sock.close()
        finally:
            server.kill()
        return (
            f"1,100 silent SMTPS connections from one address: {still_open} open after 2 s, "
            f"RSS +{grown:.1f} MiB; another address got {banner!r} in {waited:.2f} s"
        )

    def hello(self) -> str:
        server, plain, smtps = self.serve(Path(tempfile.mkdtemp()), "--idle-timeout", "5")
        try:
            with socket.create_connection(("127.0.0.1", smtps)) as partial:
                partial.sendall(PARTIAL_CLIENT_HELLO)
                started = time.monotonic()
                is_closed(partial, 60)
                hello_cut = time.monotonic() - started
            with socket.create_connection(("127.0.0.1", plain)) as client:
                replies = client.makefile("rb")
                replies.readline()
                client.sendall(b"EHLO x\r\n")
                while replies.readline()[3:4] == b"-":
                    pass
                client.sendall(b"STARTTLS\r\n")
                replies.readline()
                started = time.monotonic()
                is_closed(client, 60)
                starttls_cut = time.monotonic() - started
                replies.close()
        finally:
            server.kill()
        return (
            f"--idle-timeout 5: partial ClientHello cut after {hello_cut:.1f} s, "
            f"STARTTLS then silence after {starttls_cut:.1f} s"
        )

    @staticmethod
    def drip_until_closed(sock: socket.socket, payload: bytes, every: float, limit: float) -> str:
        started = time.monotonic()
        for byte in payload:
            if time.monotonic() - started > limit:
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return f"cut after {time.monotonic() - started:.1f} s"
            if is_closed(sock, every):
                return f"cut after {time.monotonic() - started:.1f} s"
        return f"still open after {limit:.0f} s"

    def drip(self) -> str:
        workdir = Path(tempfile.mkdtemp())
        flags = ("--idle-timeout", "5", "--data-timeout", "5")
        server, plain, _ = self.serve(workdir, *flags)
        try:
            with socket.create_connection(("127.0.0.1", plain)) as client:
                client.recv(100)
                command = self.drip_until_closed(client, b"MAIL FROM:<" + b"a" * 1000, 2.0, 24)
            with socket.create_connection(("127.0.0.1", plain)) as client:
                replies = client.makefile("rb")
                replies.readline()
                client.sendall(ENVELOPE)
                for _ in range(4):
                    replies.readline()
                data = self.drip_until_closed(client, b"x" * 1000, 2.0, 24)
                replies.close()
        finally:
            server.kill()
        return f"one byte every 2 s: of a command {command}; of message data {data}"

    def session(self) -> str:
        server, plain, _ = self.serve(Path(tempfile.mkdtemp()))
        ended = "still open after 8 s"
        try:
            with socket.create_connection(("127.0.0.1", plain)) as client:
                replies = client.makefile("rb")
                replies.readline()
                started = time.monotonic()
                while time.monotonic() - started < 8:
                    client.sendall(b"NOOP\r\n")
                    if not replies.readline().startswith(b"250"):
                        ended = f"ended after {time.monotonic() - started:.1f} s"
                        break
                    time.sleep(0.5)
                replies.close()
        finally:
            server.kill()
        return f"NOOP every 0.5 s: {ended}"

    def forward(self) -> str:
        workdir = Path(tempfile.mkdtemp())
        down = f"smtp://127.0.0.1:{free_port()}"
        server, plain, _ = self.serve(workdir, "--forward", down)
        codes = []
        try:
            for _ in range(3):
                try:
                    with smtplib.SMTP("127.0.0.1", plain, timeout=20) as client:
                        client.sendmail(
                            "a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nhi\r\n"
                        )
                        codes.append(250)
                except smtplib.SMTPDataError as exc:
                    codes.append(exc.smtp_code)
        finally:
            server.kill()
        copies = len(list((workdir / "M" / "new").iterdir()))
        return f"--maildir M --forward (down), 3 tries: replies {codes}, copies in M/new {copies}"

    def enospc(self) -> str:
        workdir = Path(tempfile.mkdtemp())
        disk = workdir / "disk"
        disk.mkdir()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)],
            capture_output=True,
            check=False,
        )
        if mounted.returncode != 0:
            return "cannot mount a tmpfs here; skipped"
        try:
            server, plain, _ = self.serve(workdir, "--maildir", str(disk / "M"), smtps=False)
            try:
                with socket.create_connection(("127.0.0.1", plain), timeout=20) as client:
                    replies = client.makefile("rb")
                    replies.readline()
                    client.sendall(ENVELOPE)
                    for _ in range(4):
                        replies.readline()
                    try:
                        client.sendall(b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 1500)
                        client.sendall(b".\r\n")
                        reply = replies.readline().strip() or b"EOF, no reply"
                    except OSError as exc:
                        reply = repr(exc).encode()
                    replies.close()
                time.sleep(0.5)
                errors = [line for line in server.log if " ERROR " in line or "Traceback" in line]
            finally:
                server.kill()
        finally:
            subprocess.run(["umount", "-l", str(disk)], check=False)
        return f"1.5 MB onto a 512 KiB tmpfs: {reply[:45]!r}; error log lines: {len(errors)}"

    def log(self) -> str:
        server, plain, _ = self.serve(Path(tempfile.mkdtemp()), smtps=False)
        batch = (
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
            b"RCPT TO:<c@nowhere.example>\r\nRSET\r\n"
        )
        flood = batch * (100_000 // len(batch) + 1)
        try:
            time.sleep(0.3)
            before = sum(len(line) + 1 for line in server.log)
            with socket.create_connection(("127.0.0.1", plain), timeout=20) as client:
                client.recv(100)
                drain = threading.Thread(target=read_all, args=(client,))
                drain.start()
                client.sendall(b"EHLO c.test\r\n" + flood + b"QUIT\r\n")
                drain.join(30)
            time.sleep(0.5)
            lines = server.log
            logged = sum(len(line) + 1 for line in lines) - before
        finally:
            server.kill()
        return f"{len(flood):,} bytes of pipelined MAIL/RCPT/RSET: {logged:,} bytes of INFO log"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="the src directory of the tree to probe")
    parser.add_argument("--probes", default=",".join(PROBES))
    argv = sys.argv[1:]
    # Everything after "--" goes to mailgate serve as it is.
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    probe = Probe(args.src.resolve(), extra)
    for name in args.probes.split(","):
        print(f"{name}: {getattr(probe, name)()}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
