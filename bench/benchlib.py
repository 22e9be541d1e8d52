"""What run.py and memory.py share: the servers under test, how to start one on a free
loopback port and stop it, and /proc readings of a server's process tree (CPU time, RSS).

Standard library only, so any Python 3.11 can drive the benchmark; the servers themselves
run from bench/.work (see bench/setup.sh).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / ".work"
VENV_PY = WORK / "venv" / "bin" / "python"
MAILGATE = WORK / "venv" / "bin" / "mailgate"
SMTP_SOURCE = WORK / "bin" / "smtp-source"
SMTP_SINK = WORK / "bin" / "smtp-sink"
HOST = "127.0.0.1"

START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


class NotRunnable(Exception):
    """A server that cannot be started here; the message says why."""


@dataclass(frozen=True)
class Limits:
    """What the heavier scenarios need a server to allow."""

    max_size: int = 256 * 1024 * 1024
    max_clients: int = 5000


@dataclass
class ServerSpec:
    name: str
    mode: str  # "sink" | "maildir"
    argv: Callable[[int, Path | None, Limits], list[str]]
    #: A fixed pause before the greeting (smtp-server's early-talker wait), in seconds.
    greeting_delay: float = 0.0
    check: Callable[[], None] = lambda: None
    notes: list[str] = field(default_factory=list)


# --- mailgate -----------------------------------------------------------------------------

_mailgate_help: str | None = None


def mailgate_help() -> str:
    """`mailgate serve --help`, cached; raises NotRunnable when it does not run."""
    global _mailgate_help
    if _mailgate_help is None:
        if not MAILGATE.exists():
            raise NotRunnable(f"{MAILGATE.relative_to(ROOT)} missing (run bench/setup.sh)")
        try:
            proc = subprocess.run(
                [str(MAILGATE), "serve", "--help"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise NotRunnable("`mailgate serve --help` hung for 20 s") from exc
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise NotRunnable(
                f"`mailgate serve --help` exited {proc.returncode}: {lines[-1] if lines else ''}"
            )
        _mailgate_help = proc.stdout
    return _mailgate_help


def _mailgate_optional_flags(limits: Limits) -> dict[str, str]:
    return {
        "--max-size": str(limits.max_size),
        "--max-clients": str(limits.max_clients),
        "--max-clients-per-ip": str(limits.max_clients),
        # One development certificate for every start, not a new RSA key per run.
        "--state-dir": str(WORK / "mailgate-state"),
    }


def _has_flag(help_text: str, flag: str) -> bool:
    return re.search(rf"{re.escape(flag)}(?![\w-])", help_text) is not None


def _mailgate_extra_flags(limits: Limits) -> list[str]:
    # The CLI may lack some of these; pass the ones it has and let the notes say which
    # defaults were left in force.
    help_text = mailgate_help()
    flags: list[str] = []
    for flag, value in _mailgate_optional_flags(limits).items():
        if _has_flag(help_text, flag):
            flags += [flag, value]
    return flags


def _mailgate_notes() -> list[str]:
    try:
        help_text = mailgate_help()
    except NotRunnable:
        return []
    return [
        f"mailgate serve has no {flag}: its default applies"
        for flag in _mailgate_optional_flags(Limits())
        if not _has_flag(help_text, flag)
    ]


def _mailgate(
    mode: str, workers: int, *, stock_loop: bool = False
) -> Callable[[int, Path | None, Limits], list[str]]:
    def argv(port: int, maildir: Path | None, limits: Limits) -> list[str]:
        # mailgate[fast] runs on uvloop; MAILGATE_LOOP=asyncio shows the engine on the
        # stock loop, the same one aiosmtpd runs on.
        env = ["/usr/bin/env", "MAILGATE_LOOP=asyncio"] if stock_loop else []
        cmd = [
            *env,
            str(MAILGATE),
            "serve",
            "--listen",
            f"{HOST}:{port}",
            "--hostname",
            "bench",
            # No -q: the INFO line per message and per session stays on (written to the
            # stderr log file), as ../shared/bench's mailgate target runs it and as
            # `mailgate serve` runs by default; -q would flatter mailgate by ~10 us per
            # message against the reference harness.
        ]
        cmd += ["--sink"] if mode == "sink" else ["--maildir", str(maildir)]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        return cmd + _mailgate_extra_flags(limits)

    return argv


def _mailgate_hooks(mode: str) -> Callable[[int, Path | None, Limits], list[str]]:
    """mailgate from code with three no-op plugins and a middleware (extension-API cost)."""

    def argv(port: int, maildir: Path | None, limits: Limits) -> list[str]:
        cmd = [str(VENV_PY), str(BENCH / "servers" / "mailgate_hooks.py")]
        cmd += ["--listen", f"{HOST}:{port}", "--max-size", str(limits.max_size)]
        cmd += ["--max-clients", str(limits.max_clients)]
        cmd += ["--state-dir", str(WORK / "mailgate-state")]
        return cmd + (["--maildir", str(maildir)] if mode == "maildir" else [])

    return argv


def _mailgate_policy(mode: str) -> Callable[[int, Path | None, Limits], list[str]]:
    """mailgate with relay control, block lists, rate limits and a DNSBL (policy cost)."""

    def argv(port: int, maildir: Path | None, limits: Limits) -> list[str]:
        cmd = [str(VENV_PY), str(BENCH / "servers" / "mailgate_policy.py")]
        cmd += ["--listen", f"{HOST}:{port}", "--max-size", str(limits.max_size)]
        cmd += ["--max-clients", str(limits.max_clients)]
        cmd += ["--state-dir", str(WORK / "mailgate-state")]
        return cmd + (["--maildir", str(maildir)] if mode == "maildir" else [])

    return argv


# --- the others ---------------------------------------------------------------------------


def _need(path: Path, what: str) -> Callable[[], None]:
    def check() -> None:
        if not path.exists():
            raise NotRunnable(f"{what} missing: {path.relative_to(ROOT)} (run bench/setup.sh)")

    return check


def _aiosmtpd(mode: str) -> Callable[[int, Path | None, Limits], list[str]]:
    def argv(port: int, maildir: Path | None, limits: Limits) -> list[str]:
        cmd = [str(VENV_PY), str(BENCH / "servers" / "aiosmtpd_server.py"), "--port", str(port)]
        cmd += ["--mode", mode, "--max-size", str(limits.max_size)]
        return cmd + (["--maildir", str(maildir)] if mode == "maildir" else [])

    return argv


def _smtp_server(wait: bool) -> Callable[[int, Path | None, Limits], list[str]]:
    def argv(port: int, maildir: Path | None, limits: Limits) -> list[str]:
        cmd = ["node", str(BENCH / "servers" / "smtp_server.js"), "--port", str(port)]
        return cmd if wait else [*cmd, "--no-greeting-wait"]

    return argv


def _smtp_sink(port: int, maildir: Path | None, limits: Limits) -> list[str]:
    # smtp-sink refuses to run as root without a user to drop to.
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    # -m: smtp-sink serves at most 256 connections at once unless told otherwise.
    return [str(SMTP_SINK), *user, "-m", str(limits.max_clients), f"{HOST}:{port}", "1024"]


def _check_node_server() -> None:
    if shutil.which("node") is None:
        raise NotRunnable("node not on PATH")
    _need(WORK / "node" / "node_modules" / "smtp-server", "smtp-server")()


def _check_mailgate() -> None:
    mailgate_help()


def all_servers() -> list[ServerSpec]:
    mg_notes = _mailgate_notes()
    return [
        ServerSpec("mailgate", "sink", _mailgate("sink", 1), check=_check_mailgate, notes=mg_notes),
        ServerSpec(
            "mailgate-w2", "sink", _mailgate("sink", 2), check=_check_mailgate, notes=mg_notes
        ),
        ServerSpec(
            "mailgate-asyncio",
            "sink",
            _mailgate("sink", 1, stock_loop=True),
            check=_check_mailgate,
            notes=mg_notes,
        ),
        ServerSpec(
            "mailgate-hooks", "sink", _mailgate_hooks("sink"), check=_need(VENV_PY, "bench venv")
        ),
        ServerSpec(
            "mailgate-policy", "sink", _mailgate_policy("sink"), check=_need(VENV_PY, "bench venv")
        ),
        ServerSpec("aiosmtpd", "sink", _aiosmtpd("sink"), check=_need(VENV_PY, "bench venv")),
        ServerSpec(
            "smtp-server", "sink", _smtp_server(True), greeting_delay=0.1, check=_check_node_server
        ),
        ServerSpec("smtp-server-nowait", "sink", _smtp_server(False), check=_check_node_server),
        ServerSpec("postfix-smtp-sink", "sink", _smtp_sink, check=_need(SMTP_SINK, "smtp-sink")),
        ServerSpec(
            "mailgate", "maildir", _mailgate("maildir", 1), check=_check_mailgate, notes=mg_notes
        ),
        ServerSpec(
            "mailgate-w2",
            "maildir",
            _mailgate("maildir", 2),
            check=_check_mailgate,
            notes=mg_notes,
        ),
        ServerSpec(
            "mailgate-asyncio",
            "maildir",
            _mailgate("maildir", 1, stock_loop=True),
            check=_check_mailgate,
            notes=mg_notes,
        ),
        ServerSpec(
            "mailgate-hooks",
            "maildir",
            _mailgate_hooks("maildir"),
            check=_need(VENV_PY, "bench venv"),
        ),
        ServerSpec(
            "mailgate-policy",
            "maildir",
            _mailgate_policy("maildir"),
            check=_need(VENV_PY, "bench venv"),
        ),
        ServerSpec("aiosmtpd", "maildir", _aiosmtpd("maildir"), check=_need(VENV_PY, "bench venv")),
    ]


# --- running one server -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait_greeting(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll until the server answers a connection with 220, or fail with its last words."""
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NotRunnable(f"exited with {proc.returncode} at start: {log_tail(log)}")
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                greeting = s.recv(512)
                if greeting.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    with contextlib.suppress(OSError):
                        s.recv(512)
                    return
                last_error = f"greeting {greeting[:80]!r}"
        except OSError as exc:
            last_error = str(exc)
        time.sleep(0.02)
    raise NotRunnable(f"no 220 greeting within {timeout:.0f} s ({last_error}) {log_tail(log)}")


def log_tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_bytes().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])[:300]


@dataclass
class Running:
    spec: ServerSpec
    port: int
    proc: subprocess.Popen[bytes]
    maildir: Path | None
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextlib.contextmanager
def running(spec: ServerSpec, limits: Limits | None = None) -> Iterator[Running]:
    """Start `spec` on a free loopback port, wait for its greeting, stop it on exit.

    The server runs in its own session so the whole tree (mailgate's workers too) is
    signalled and measured together. A Maildir server gets a fresh directory, removed after.
    """
    spec.check()
    limits = limits or Limits()
    tmp = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=_tmp_root()))
    maildir = tmp / "Maildir" if spec.mode == "maildir" else None
    port = free_port()
    log = tmp / "stderr.log"
    stderr_file = open(log, "wb")  # noqa: SIM115 - lives as long as proc
    try:
        proc = subprocess.Popen(
            spec.argv(port, maildir, limits),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
            start_new_session=True,
            cwd=tmp,
        )
    except OSError as exc:
        stderr_file.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise NotRunnable(str(exc)) from exc
    try:
        _wait_greeting(port, proc, log, START_TIMEOUT)
        yield Running(spec, port, proc, maildir, log)
    finally:
        stop(proc)
        stderr_file.close()
        shutil.rmtree(tmp, ignore_errors=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    # Workers that outlived their parent are still in the process group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tmp_root() -> Path:
    root = WORK / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root


# --- /proc readings -----------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after its last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(root: int) -> float:
    """User + system CPU of the live tree under `root`, plus what its reaped children used."""
    ticks = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            # stat fields 14-17 (utime stime cutime cstime); index 0 here is field 3.
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / CLK_TCK


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kb(root: int) -> int:
    return sum(_status_kb(pid, "VmRSS") for pid in process_tree(root))


def peak_rss_kb(root: int) -> int:
    return sum(_status_kb(pid, "VmHWM") for pid in process_tree(root))


def reset_peak_rss(root: int) -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+, `clear_refs` value 5); False if refused."""
    ok = True
    for pid in process_tree(root):
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok
