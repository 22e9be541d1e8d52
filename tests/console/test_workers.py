"""``--workers N``: every worker's console answers with the sum over all workers."""

from __future__ import annotations

import json
import smtplib
import socket
from pathlib import Path

import pytest
from tests.console.test_metrics import scrape, value
from tests.server.harness import CLIServer, wait_for

from mailgate.console.metrics import merge
from mailgate.console.workers import SharedCounters

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_two_workers_one_view(tmp_path: Path) -> None:
    smtp_port, console_port = _free_port(), _free_port()
    cli = CLIServer(
        [
            "--listen",
            f"127.0.0.1:{smtp_port}",
            "--admin-listen",
            f"127.0.0.1:{console_port}",
            "--workers",
            "2",
            "--sink",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        cwd=tmp_path,
    ).start(expected_listeners=2)
    try:
        assert wait_for(
            lambda: len(list((tmp_path / "state" / "console").glob("run-*/*.json"))) == 2
        )
        sessions = 12
        for _ in range(sessions):
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
                client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        # Each worker publishes at least once a second; after that, every scrape (whichever
        # worker the kernel gives it to) sees all of them.
        assert wait_for(
            lambda: (
                value(scrape(console_port), "mailgate_sessions_total", outcome="quit") == sessions
            ),
            timeout=15,
        )
        seen = 0.0
        for _ in range(8):
            samples = scrape(console_port)
            # Never back, whichever worker answered.
            assert value(samples, "mailgate_connections_total") >= seen
            seen = value(samples, "mailgate_connections_total")
            assert value(samples, "mailgate_messages_accepted_total") == sessions
            assert value(samples, "mailgate_connections_total") == sessions
            assert value(samples, "mailgate_message_bytes_total") == sessions * len(MESSAGE)
        # Both workers took connections (the kernel spreads them by address and port).
        run_dirs = list((tmp_path / "state" / "console").glob("run-*"))
        assert len(run_dirs) == 1
        per_worker = [
            json.loads(path.read_text())["connections_total"] for path in run_dirs[0].glob("*.json")
        ]
        assert len(per_worker) == 2 and sum(per_worker) == sessions
        assert cli.stop() == 0
    finally:
        cli.kill()


def test_dead_worker_keeps_its_counts_but_not_its_open_connections(tmp_path: Path) -> None:
    own = {"connections_open": 1, "connections_total": 5, "sessions": {"quit": 4}}
    shared = SharedCounters(tmp_path, lambda: dict(own), run_id=1)
    shared.setup()
    dead_pid = 2**22 + 12345  # above the usual pid_max: no such process
    (shared.directory / f"{dead_pid}.json").write_text(
        json.dumps({"connections_open": 3, "connections_total": 7, "sessions": {"quit": 6}})
    )
    (shared.directory / "junk.json").write_text("{not json")
    total = shared.total()
    assert total == {"connections_open": 1, "connections_total": 12, "sessions": {"quit": 10}}
    # The answering process wrote its own file first: the others read the same figures.
    assert json.loads(shared.path.read_text()) == own


def test_setup_removes_directories_of_ended_runs(tmp_path: Path) -> None:
    ended = tmp_path / "console" / f"run-{2**22 + 777}"
    ended.mkdir(parents=True)
    (ended / "1.json").write_text("{}")
    SharedCounters(tmp_path, dict, run_id=1).setup()
    assert not ended.exists()
    assert (tmp_path / "console" / "run-1").is_dir()


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ({"n": 1, "d": {"x": 1}}, {"n": 2, "d": {"x": 1, "y": 3}}, {"n": 3, "d": {"x": 2, "y": 3}}),
        (
            {"h": {"counts": [1, 0], "sum": 0.5}},
            {"h": {"counts": [0, 2], "sum": 1.0}},
            {"h": {"counts": [1, 2], "sum": 1.5}},
        ),
    ],
)
def test_merge(a: dict[str, object], b: dict[str, object], expected: dict[str, object]) -> None:
    assert merge(a, b) == expected
