"""``python -m mailgate serve`` as a real process: defaults, start-up errors, signals, workers.

Everything here goes through the command line and the process boundary (exit codes,
stderr, SIGKILL/SIGTERM/SIGHUP, forked workers), which the in-process tests cannot reach.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailgate.protocol.proxy import build_proxy_v1

from .harness import Certs, CLIServer, maildir_messages, make_certs, strip_received, wait_for

SENDER, RECIPIENT = "a@example.com", "b@example.com"
# A line that begins like a text-format log record, to tell log lines from other output.
TEXT_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \[(\d+)\] ")
IN_USE = "already in use"


def message(marker: str, filler: int = 200) -> bytes:
    """A message whose bytes are unique to ``marker``; ``filler`` pads the body."""
    body = b"".join(f"{marker} line {i:04d} ".encode() + b"." * 40 + b"\r\n" for i in range(filler))
    return (
        f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: {marker}\r\n"
        f"Message-ID: <{marker}@process.test>\r\n\r\n"
    ).encode() + body


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serving(
    make_args: Callable[[int], list[str]], cwd: Path, *, listeners: int = 1, attempts: int = 5
) -> Iterator[CLIServer]:
    """Run ``mailgate serve`` on a free port (the CLI refuses port 0); try another port
    when something took the chosen one in the meantime. Killed (the whole process group)
    on the way out whatever happened."""
    server = None
    for _ in range(attempts):
        port = free_port()
        candidate = CLIServer(make_args(port), cwd).start(expected_listeners=listeners)
        if len(candidate.ports) >= listeners:
            server = candidate
            break
        candidate.kill()
        if IN_USE not in candidate.text():
            raise AssertionError(f"mailgate serve did not start:\n{candidate.text()}")
    assert server is not None, f"no free port in {attempts} attempts"
    try:
        yield server
    finally:
        server.kill()


def base_args(tmp_path: Path, port: int, *extra: str) -> list[str]:
    return [
        "--listen", f"127.0.0.1:{port}",
        "--hostname", "mx.test",
        "--maildir", str(tmp_path / "maildir"),
        "--state-dir", str(tmp_path / "state"),
        *extra,
    ]  # fmt: skip


def tls_args(certs: Certs) -> list[str]:
    return ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key)]


def stored_bodies(maildir: Path) -> list[bytes]:
    return [strip_received(stored) for stored in maildir_messages(maildir)]


def send(port: int, data: bytes, *, helo: str = "client.test") -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=10) as client:
        assert client.sendmail(SENDER, [RECIPIENT], data) == {}


class Raw:
    """A line-oriented SMTP client socket for sessions that need exact timing."""

    def __init__(self, port: int, *, greet: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        if greet:
            assert self.code() == 220

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def code(self) -> int:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed by the server")
            if line[3:4] != b"-":
                return int(line[:3])

    def command(self, line: bytes) -> int:
        self.send(line + b"\r\n")
        return self.code()

    def at_eof(self) -> bool:
        return self.file.readline() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


# --- defaults and start-up ----------------------------------------------------------------


def test_relative_defaults_are_under_the_working_directory(tmp_path: Path) -> None:
    data = message("defaults", filler=3)
    with serving(lambda port: ["--listen", f"127.0.0.1:{port}"], tmp_path) as server:
        send(server.port, data)
        assert stored_bodies(tmp_path / "maildir") == [data]
        # The development certificate went to ./.mailgate, and STARTTLS presents it.
        dev_cert = tmp_path / ".mailgate" / "dev-cert.pem"
        with starttls(server.port, dev_cert) as client:
            assert client.noop()[0] == 250
        assert server.stop() == 0


def test_no_flags_listens_on_127_0_0_1_port_2525(tmp_path: Path) -> None:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 2525))
        except OSError:
            pytest.skip("127.0.0.1:2525 is in use on this machine")
    server = CLIServer([], tmp_path).start()
    try:
        if not server.ports and IN_USE in server.text():
            pytest.skip("127.0.0.1:2525 was taken by another process meanwhile")
        assert "listening on 127.0.0.1 port 2525 (SMTP)" in server.text()
        data = message("no-flags", filler=3)
        send(2525, data)
        assert stored_bodies(tmp_path / "maildir") == [data]
        assert server.stop() == 0
    finally:
        server.kill()


def non_log_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not TEXT_LOG_LINE.match(line)]


def test_port_in_use_exits_2_with_one_line(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    with serving(lambda port: base_args(tmp_path, port, *tls_args(certs)), tmp_path) as first:
        address = f"127.0.0.1:{first.port}"
        second = tmp_path / "second"
        second.mkdir()

        def run_second(*extra: str) -> subprocess.CompletedProcess[str]:
            args = [*base_args(second, first.port), *tls_args(certs), *extra]
            return subprocess.run(
                [sys.executable, "-m", "mailgate", "serve", *args],
                cwd=second, capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip

        for extra in ((), ("--workers", "2")):
            result = run_second(*extra)
            assert result.returncode == 2, (extra, result.stderr)
            (error,) = non_log_lines(result.stderr)
            assert error.startswith("mailgate: cannot start: "), error
            assert address in error and IN_USE in error.lower(), error

        # With log lines turned down to warnings, the error is all that is printed.
        result = run_second("--quiet")
        assert result.returncode == 2
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert address in result.stderr

        # The first server is unharmed.
        data = message("still-serving", filler=3)
        send(first.port, data)
        assert stored_bodies(tmp_path / "maildir") == [data]


# --- signals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clients", "reuse"),
    [(4, True), (12, False)],
    ids=["4-clients-reused-connections", "12-clients-new-connection-per-message"],
)
def test_kill_9_under_load_loses_no_accepted_message(
    tmp_path: Path, clients: int, reuse: bool
) -> None:
    """SIGKILL in the middle of concurrent deliveries: every message that got its 250 is
    in new/, whole, once. With a connection per message many commits are in flight at
    once, so the kill lands inside batches of the group commit (files synced and linked,
    new/ not yet synced, answers not yet sent)."""
    maildir = tmp_path / "maildir"
    accepted: dict[str, bytes] = {}
    attempted: dict[str, bytes] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + 10

    def one_connection(port: int) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", port, timeout=5)

    def client(worker: int, port: int) -> None:
        connection: smtplib.SMTP | None = None
        try:
            for i in range(300):
                if time.monotonic() > deadline:
                    return
                if connection is None:
                    connection = one_connection(port)
                marker = f"load-{worker}-{i:03d}"
                # Bodies of varying size, so that a torn write would show.
                data = message(marker, filler=20 + (i * 37) % 200)
                with lock:
                    attempted[marker] = data
                connection.sendmail(SENDER, [RECIPIENT], data)
                with lock:
                    accepted[marker] = data
                if not reuse:
                    connection.quit()
                    connection = None
        except (smtplib.SMTPException, OSError):
            return  # the server is gone: this client is done
        finally:
            if connection is not None:
                connection.close()

    with serving(lambda port: base_args(tmp_path, port), tmp_path) as server:
        threads = [
            threading.Thread(target=client, args=(n, server.port), daemon=True)
            for n in range(clients)
        ]
        for thread in threads:
            thread.start()
        started = time.monotonic()

        def busy() -> bool:
            # Well into the load (300 messages, or 1.5 s on a slow disk), clients mid-stream.
            count = len(accepted)
            return count >= 300 or (count >= 20 and time.monotonic() - started >= 1.5)

        assert wait_for(busy, timeout=8), f"only {len(accepted)} messages accepted"
        server.kill()
        for thread in threads:
            thread.join(15)
        assert not any(thread.is_alive() for thread in threads)

    assert len(accepted) < len(attempted) <= 300 * clients, "the kill should interrupt the clients"
    stored = stored_bodies(maildir)
    # Nothing in new/ is partial or foreign: each file is one whole message a client sent.
    known = set(attempted.values())
    assert all(body in known for body in stored)
    assert len(set(stored)) == len(stored), "a message was delivered twice"
    missing = sorted(marker for marker, data in accepted.items() if data not in set(stored))
    assert not missing, f"{len(missing)} messages got 250 but are not in new/: {missing[:5]}"


def _commit_process_of(server_pid: int) -> int | None:
    """The pid of the Maildir commit process a server started, if it runs."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == server_pid and b"_maildir_commitd" in command:
            return int(entry.name)
    return None


def test_kill_9_of_the_commit_process_loses_no_accepted_message(tmp_path: Path) -> None:
    """SIGKILL of the Maildir's commit process alone, under load (a connection per
    message): the messages it had not answered are refused 451 (the client sends them
    again; one may then be there twice, none is lost), every message that got its 250
    is in new/ whole, and the server starts another commit process and goes on."""
    maildir = tmp_path / "maildir"
    accepted: dict[str, bytes] = {}
    attempted: dict[str, bytes] = {}
    refused: list[int] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 10
    stop = threading.Event()

    def client(worker: int, port: int) -> None:
        for i in range(400):
            if stop.is_set() or time.monotonic() > deadline:
                return
            marker = f"load-{worker}-{i:03d}"
            data = message(marker, filler=20 + (i * 37) % 200)
            with lock:
                attempted[marker] = data
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=5) as connection:
                    connection.sendmail(SENDER, [RECIPIENT], data)
            except smtplib.SMTPResponseException as exc:
                with lock:
                    refused.append(exc.smtp_code)
                continue
            except (smtplib.SMTPException, OSError):
                return
            with lock:
                accepted[marker] = data

    with serving(lambda port: base_args(tmp_path, port), tmp_path) as server:
        assert server.proc is not None
        threads = [
            threading.Thread(target=client, args=(n, server.port), daemon=True) for n in range(8)
        ]
        for thread in threads:
            thread.start()
        assert wait_for(lambda: len(accepted) >= 60, timeout=8), f"only {len(accepted)} accepted"
        helper = _commit_process_of(server.proc.pid)
        assert helper is not None, "no commit process found"
        os.kill(helper, signal.SIGKILL)
        killed_at = len(accepted)
        # The server goes on with a new commit process.
        assert wait_for(lambda: len(accepted) >= killed_at + 60, timeout=8), server.text()
        replacement = _commit_process_of(server.proc.pid)
        assert replacement is not None and replacement != helper
        stop.set()
        for thread in threads:
            thread.join(15)
        assert not any(thread.is_alive() for thread in threads)
        assert server.proc.poll() is None, "the server itself must survive"

    assert all(code == 451 for code in refused), refused
    stored = stored_bodies(maildir)
    known = set(attempted.values())
    assert all(body in known for body in stored)
    stored_set = set(stored)
    missing = sorted(marker for marker, data in accepted.items() if data not in stored_set)
    assert not missing, f"{len(missing)} messages got 250 but are not in new/: {missing[:5]}"
    # These clients never send a refused message again: nothing is there twice.
    assert len(stored_set) == len(stored), "a message was delivered twice"


def test_sigterm_lets_the_message_in_flight_finish(tmp_path: Path) -> None:
    close_timeout = 10.0
    args = lambda port: base_args(tmp_path, port, "--close-timeout", str(close_timeout))  # noqa: E731
    with serving(args, tmp_path) as server:
        busy = Raw(server.port)
        for command, code in (
            (b"EHLO busy.test", 250),
            (b"MAIL FROM:<a@example.com>", 250),
            (b"RCPT TO:<b@example.com>", 250),
            (b"DATA", 354),
        ):
            assert busy.command(command) == code
        head = b"Subject: in flight\r\n\r\nfirst half\r\n"
        tail = b"second half\r\n"
        busy.send(head)
        idle = Raw(server.port)
        assert idle.command(b"EHLO idle.test") == 250

        server.signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert wait_for(lambda: "SIGTERM received" in server.text()), server.text()
        assert idle.code() == 421  # an idle session is told at once
        assert idle.at_eof()
        assert server.proc is not None and server.proc.poll() is None  # still waiting for us

        busy.send(tail + b".\r\n")
        assert busy.code() == 250
        assert busy.code() == 421  # and then the session is closed
        assert busy.at_eof()
        assert server.wait(close_timeout) == 0
        assert time.monotonic() - signalled < close_timeout
        busy.close()
        idle.close()
    assert stored_bodies(tmp_path / "maildir") == [head + tail]


def replace_files(source: Certs, target: Certs) -> None:
    """Put another certificate and key in place, each file swapped atomically."""
    for new, live in ((source.cert, target.cert), (source.key, target.key)):
        staged = live.with_name(live.name + ".new")
        shutil.copyfile(new, staged)
        os.replace(staged, live)


def starttls(port: int, ca_file: Path) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    try:
        client.starttls(context=ssl.create_default_context(cafile=str(ca_file)))
    except BaseException:
        client.close()
        raise
    return client


def test_sighup_reloads_certificates_keeping_connections(tmp_path: Path) -> None:
    first, second, live = (tmp_path / name for name in ("ca1", "ca2", "live"))
    for directory in (first, second, live):
        directory.mkdir()
    certs_a, certs_b, certs_live = make_certs(first), make_certs(second), make_certs(live)
    replace_files(certs_a, certs_live)

    with serving(lambda port: base_args(tmp_path, port, *tls_args(certs_live)), tmp_path) as server:
        idle = Raw(server.port)
        assert idle.command(b"EHLO idle.test") == 250
        secured = starttls(server.port, certs_a.ca_file)  # a TLS session made with cert A
        assert secured.ehlo()[0] == 250

        replace_files(certs_b, certs_live)
        server.signal(signal.SIGHUP)
        assert wait_for(lambda: "configuration reloaded" in server.text()), server.text()

        assert idle.command(b"NOOP") == 250
        assert secured.noop()[0] == 250
        with starttls(server.port, certs_b.ca_file) as fresh:
            assert fresh.noop()[0] == 250
        with pytest.raises(ssl.SSLCertVerificationError):
            starttls(server.port, certs_a.ca_file)

        data = message("after-reload", filler=3)
        secured.sendmail(SENDER, [RECIPIENT], data)
        secured.quit()
        assert idle.command(b"QUIT") == 221
        idle.close()
        assert stored_bodies(tmp_path / "maildir") == [data]
        assert server.stop() == 0


# --- workers and logging ------------------------------------------------------------------


def json_log(server: CLIServer) -> list[dict[str, object]]:
    records = []
    for line in server.log:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    return records


def test_two_workers_share_the_port(tmp_path: Path) -> None:
    args = lambda port: base_args(tmp_path, port, "--workers", "2", "--log-format", "json")  # noqa: E731
    with serving(args, tmp_path, listeners=2) as server:
        assert len(set(server.ports)) == 1
        sent = [message(f"worker-{i:02d}", filler=3) for i in range(50)]
        for data in sent:
            send(server.port, data)  # a new connection each: the kernel picks the worker
        assert sorted(stored_bodies(tmp_path / "maildir")) == sorted(sent)
        assert server.stop() == 0

    records = json_log(server)
    assert server.proc is not None
    listening = {r["pid"] for r in records if str(r["msg"]).startswith("listening on ")}
    accepting = {r["pid"] for r in records if " accepted " in str(r["msg"])}
    assert len(listening) == 2 and server.proc.pid not in listening, records
    assert accepting == listening, "both workers should have taken some of the 50 connections"
    stopped = [int(str(r["pid"])) for r in records if str(r["msg"]).startswith("stopped;")]
    assert sorted(stopped) == sorted(int(str(pid)) for pid in listening)


def test_text_log_names_each_worker_pid(tmp_path: Path) -> None:
    with serving(
        lambda port: base_args(tmp_path, port, "--workers", "2"), tmp_path, listeners=2
    ) as server:
        pids = set()
        for line in server.log:
            match = TEXT_LOG_LINE.match(line)
            if match and " listening on " in line:
                pids.add(int(match.group(1)))
        assert len(pids) == 2, server.text()


def test_json_log_format(tmp_path: Path) -> None:
    args = lambda port: base_args(tmp_path, port, "--log-format", "json")  # noqa: E731
    with serving(args, tmp_path) as server:
        send(server.port, message("json-log", filler=3))
        assert server.stop() == 0
    records = json_log(server)
    assert server.proc is not None
    for record in records:
        assert {"ts", "level", "logger", "pid", "msg"} <= record.keys(), record
        assert record["pid"] == server.proc.pid
    # The dev certificate warning, the listener, the message and the shutdown are all there.
    assert {record["level"] for record in records} == {"info", "warning"}
    messages = [str(record["msg"]) for record in records]
    for expected in ("listening on 127.0.0.1 port", " accepted ", "SIGTERM received", "stopped;"):
        assert any(expected in text for text in messages), (expected, messages)


def test_verbose_logs_each_command(tmp_path: Path) -> None:
    args = lambda port: base_args(tmp_path, port, "--log-format", "json", "--verbose")  # noqa: E731
    with serving(args, tmp_path) as server:
        send(server.port, message("verbose", filler=3))
        assert server.stop() == 0
    debug = [str(r["msg"]) for r in json_log(server) if r["level"] == "debug"]
    # smtplib sends the verb in lower case ("mail FROM:").
    assert any("mail from:<" in text.lower() for text in debug), debug


def test_proxy_protocol_from_the_command_line(tmp_path: Path) -> None:
    args = lambda port: base_args(  # noqa: E731
        tmp_path, port, "--proxy-protocol", "127.0.0.0/8", "--local-domains", "example.com"
    )
    with serving(args, tmp_path) as server:
        proxied = Raw(server.port, greet=False)
        proxied.send(build_proxy_v1("203.0.113.9", 4444, "192.0.2.1", 25))
        assert proxied.code() == 220
        for command, code in (
            (b"EHLO behind.proxy.test", 250),
            (b"MAIL FROM:<a@example.com>", 250),
            (b"RCPT TO:<b@example.com>", 250),
            (b"DATA", 354),
        ):
            assert proxied.command(command) == code
        data = message("proxied", filler=3)
        proxied.send(data + b".\r\n")
        assert proxied.code() == 250
        assert proxied.command(b"QUIT") == 221
        proxied.close()

        direct = Raw(server.port, greet=False)
        direct.send(b"EHLO no.header.test\r\n")
        assert direct.code() == 421
        direct.close()

    (stored,) = maildir_messages(tmp_path / "maildir")
    assert strip_received(stored) == data
    received = stored[: len(stored) - len(data)].decode()
    assert "from behind.proxy.test ([203.0.113.9])" in received, received
    assert "127.0.0.1" not in received
