"""The garbage collector's settings while the runner serves (runner._settle_heap): start-up
objects frozen and the youngest generation collected less often, only in a process the
runner owns (``SMTPServer.run()``, ``mailgate serve``), never for a program that awaits
``serve()`` itself. Each case runs in a child process: freezing the test process's heap
would outlive the test."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mailgate

#: Where the mailgate under test lives (src/, or the compiled build's site directory).
SITE = Path(mailgate.__file__).resolve().parents[1]

#: A server that starts, asks for SIGTERM, and prints the collector's state at shutdown.
CHILD = textwrap.dedent(
    """
    import asyncio, gc, os, signal, sys
    from mailgate.server.options import ServerOptions
    from mailgate.server.runner import run_server, serve

    class Server:
        options = ServerOptions()
        messages_accepted = 0

        async def start(self, *, reuse_port=False):
            loop = asyncio.get_running_loop()
            loop.call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)

        async def shutdown(self):
            print("frozen", gc.get_freeze_count(), "threshold", gc.get_threshold()[0])

        def reload(self, options):
            pass

    if sys.argv[1] == "run_server":
        sys.exit(run_server(Server()))
    asyncio.run(serve(Server()))
    """
)


def _child(how: str) -> tuple[int, int]:
    env = {**os.environ, "PYTHONPATH": str(SITE)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, how],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    assert words[0] == "frozen" and words[2] == "threshold", done.stdout
    return int(words[1]), int(words[3])


def test_the_runner_freezes_start_up_objects_and_collects_less_often() -> None:
    frozen, threshold = _child("run_server")
    assert frozen > 1000  # the modules and objects of start-up
    assert threshold == 7000


def test_a_program_awaiting_serve_keeps_its_collector_settings() -> None:
    frozen, threshold = _child("serve")
    assert frozen == 0
    assert threshold == 700  # Python's default
