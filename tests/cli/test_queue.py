"""``mailgate queue ...`` against a real queue filled through the store API: text and JSON
output, and the effect of every action checked through the store."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from tests.cli.conftest import (
    Queue,
    mailgate_command,
    mailgate_env,
    run,
)

from mailgate import cli
from mailgate.queue import QueueFilter, QueueStore, RecipientState

PENDING_SCRIPT = Path(__file__).resolve().parents[3] / "shared/bench/targets/mailgate/pending"


def main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(list(args))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return status, captured.out, captured.err


def states(queue: Queue, message_id: str) -> dict[str, RecipientState]:
    async def query(store: QueueStore) -> dict[str, RecipientState]:
        [message] = await store.list_messages(QueueFilter(ids=(message_id,)))
        return {recipient.address: recipient.state for recipient in message.recipients}

    return queue.read(query)


def one_line(err: str, *needles: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- list --------------------------------------------------------------------------------------


def test_list_text_shows_each_recipient_state_attempts_and_last_reply(
    queue: Queue, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = main(capsys, "queue", "list", "--config", str(queue.config))
    assert status == 0, err
    lines = out.splitlines()
    # Oldest first: the message received 90 minutes ago leads.
    assert lines[0].startswith(f"{queue.old}  ")
    assert "1h30m old" in lines[0] and "from <ann@corp.example>" in lines[0]
    text = "\n".join(lines)
    bob = next(line for line in lines if "bob@example.net" in line)
    assert "deferred" in bob and "1 attempt," in bob
    # The first retry comes 5 minutes later, varied by up to 10 %.
    assert "next attempt in 4m" in bob or "next attempt in 5m" in bob
    assert "last reply: 451 4.3.0 try again later" in bob
    carol = next(line for line in lines if "carol@example.org" in line)
    assert "failed" in carol and "550 5.1.1 no such user" in carol
    dave = next(line for line in lines if "dave@partner.example" in line)
    assert "delivered" in dave
    postmaster = next(line for line in lines if "postmaster@example.net" in line)
    assert "held" in postmaster and "kept for the postmaster" in postmaster
    assert "from <>" in text
    assert lines[-1] == (
        "-- 3 messages, 5 recipients (1 queued, 1 deferred, 1 held, 1 delivered, 1 failed)"
    )


def test_list_json_gives_every_field(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = main(capsys, "queue", "list", "--json", "--config", str(queue.config))
    assert status == 0
    document = json.loads(out)
    messages = {message["id"]: message for message in document["messages"]}
    assert list(messages) == [queue.old, queue.mixed, queue.held]
    mixed = messages[queue.mixed]
    assert mixed["sender"] == "alice@corp.example"
    assert mixed["size"] > 0 and mixed["age"] >= 0
    assert mixed["client"]["address"] == "192.0.2.7"
    assert mixed["received_at"].endswith("Z")
    by_address = {recipient["address"]: recipient for recipient in mixed["recipients"]}
    bob = by_address["bob@example.net"]
    assert bob["state"] == "deferred"
    assert bob["attempts"] == 1
    assert bob["destination"] == "relay:example.net"
    assert bob["last_reply"] == {"code": 451, "enhanced": "4.3.0", "text": "try again later"}
    assert bob["remote_mta"] == "mx.example[192.0.2.1]:25"
    assert 200 < bob["next_attempt_in"] <= 330
    assert by_address["carol@example.org"]["state"] == "failed"
    assert by_address["carol@example.org"]["next_attempt"] is None
    assert by_address["carol@example.org"]["dsn_pending"] == "failure"
    assert by_address["dave@partner.example"]["state"] == "delivered"
    assert messages[queue.held]["sender"] == ""
    assert messages[queue.held]["recipients"][0]["held_reason"] == "kept for the postmaster"


def test_list_filters_by_state_and_domain(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    def ids(*args: str) -> list[str]:
        status, out, _ = main(
            capsys, "queue", "list", "--json", "--config", str(queue.config), *args
        )
        assert status == 0
        return [message["id"] for message in json.loads(out)["messages"]]

    assert ids("--state", "held") == [queue.held]
    assert ids("--state", "queued", "--state", "deferred") == [queue.old, queue.mixed]
    assert ids("--state", "failed") == [queue.mixed]
    assert ids("--domain", "EXAMPLE.ORG") == [queue.old, queue.mixed]
    assert ids("--domain", "partner.example") == [queue.mixed]
    assert ids("--domain", "nowhere.example") == []


def test_list_of_an_empty_queue(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The directory exists but the server has not opened it yet: empty, and nothing made.
    directory = config.parent / "spool" / "queue"
    directory.mkdir(parents=True)
    status, out, _ = main(capsys, "queue", "list", "--config", str(config))
    assert (status, out) == (0, "the queue is empty\n")
    status, out, _ = main(capsys, "queue", "list", "--json", "--config", str(config))
    assert (status, json.loads(out)) == (0, {"messages": []})
    assert list(directory.iterdir()) == []


def test_the_bench_pending_script_counts_messages_with_pending_recipients(
    queue: Queue, tmp_path: Path
) -> None:
    """bench/targets/mailgate/pending parses `queue list --json`: the old message (queued)
    and the mixed one (bob deferred) are pending; the held bounce is not."""
    if not PENDING_SCRIPT.exists():
        pytest.skip(f"{PENDING_SCRIPT} is not on this machine")
    port = "2599"
    bench = tmp_path / "bench"
    (bench / port).mkdir(parents=True)
    (bench / port / "mailgate.toml").write_text(
        queue.config.read_text().replace('path = "spool/queue"', f'path = "{queue.directory}"')
    )
    # The script runs `mailgate` when on PATH: make that this tree's.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "mailgate"
    wrapper.write_text(f'#!/bin/sh\nexec {" ".join(mailgate_command())} "$@"\n')
    wrapper.chmod(0o755)
    env = mailgate_env()
    env.update(
        MODE="relay",
        PORT=port,
        BENCH_MAILGATE_TMP=str(bench),
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
    )
    result = subprocess.run(
        ["sh", str(PENDING_SCRIPT)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"


# --- show --------------------------------------------------------------------------------------


def test_show_text_has_envelope_recipients_history_and_headers(
    queue: Queue, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = main(
        capsys, "queue", "show", queue.mixed.lower(), "--config", str(queue.config)
    )
    assert status == 0
    assert out.startswith(f"message {queue.mixed}\n")
    assert "  sender     <alice@corp.example>" in out
    assert "192.0.2.7, helo client.example, ESMTP" in out
    assert "  tls        REQUIRETLS (only over verified TLS" in out
    assert "bob@example.net  deferred  via relay:example.net" in out
    assert "remote MTA mx.example[192.0.2.1]:25" in out
    history = out.split("\nhistory\n")[1].split("\nheaders\n")[0]
    assert "enqueued" in history
    assert "deferred  bob@example.net  attempt 1  451 4.3.0 try again later" in history
    assert "failed  carol@example.org  attempt 1  550 5.1.1 no such user" in history
    headers = out.split("\nheaders\n")[1]
    assert "  Subject: quarterly numbers" in headers
    assert "  X-Folded: one two" in headers
    assert "The numbers are in" not in out


def test_show_json(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = main(
        capsys, "queue", "show", queue.mixed, "--json", "--config", str(queue.config)
    )
    assert status == 0
    document = json.loads(out)
    assert document["id"] == queue.mixed
    assert (document["requiretls"], document["tls_required_no"]) == (True, False)
    assert ["Subject", "quarterly numbers"] in document["headers"]
    events = [(entry["event"], entry["recipient"]) for entry in document["history"]]
    assert ("enqueued", None) in events
    assert ("deferred", "bob@example.net") in events
    deferred = next(entry for entry in document["history"] if entry["event"] == "deferred")
    assert deferred["reply"] == {"code": 451, "enhanced": "4.3.0", "text": "try again later"}
    assert deferred["attempt"] == 1


def test_show_of_an_unknown_id(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = main(capsys, "queue", "show", "NOSUCHID", "--config", str(queue.config))
    assert (status, out) == (1, "")
    one_line(err, "no message NOSUCHID in the queue")


# --- actions ---------------------------------------------------------------------------------


def test_flush_makes_deferred_recipients_due_now(
    queue: Queue, capsys: pytest.CaptureFixture[str]
) -> None:
    async def bob_due(store: QueueStore) -> float:
        [message] = await store.list_messages(QueueFilter(ids=(queue.mixed,)))
        [bob] = [r for r in message.recipients if r.address == "bob@example.net"]
        return bob.next_attempt

    assert queue.read(bob_due) > time.time() + 60
    status, out, _ = main(
        capsys, "queue", "flush", "--domain", "example.org", "--config", str(queue.config)
    )
    assert status == 0
    assert out == "0 recipients made due now; a running server tries them within a second\n"
    assert queue.read(bob_due) > time.time() + 60
    status, out, _ = main(capsys, "queue", "flush", queue.mixed, "--config", str(queue.config))
    assert status == 0
    assert out.startswith("1 recipient made due now")
    assert queue.read(bob_due) <= time.time()


def test_hold_and_release(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = main(
        capsys,
        "queue",
        "hold",
        queue.mixed,
        queue.old,
        "--reason",
        "spam?",
        "--config",
        str(queue.config),
    )
    assert (status, out) == (0, "2 recipients of 2 messages held\n")
    assert states(queue, queue.mixed) == {
        "bob@example.net": RecipientState.HELD,
        "carol@example.org": RecipientState.FAILED,
        "dave@partner.example": RecipientState.DELIVERED,
    }
    assert states(queue, queue.old) == {"erin@example.org": RecipientState.HELD}
    status, out, _ = main(capsys, "queue", "list", "--state", "held", "--config", str(queue.config))
    assert "spam?" in out
    status, out, _ = main(capsys, "queue", "release", queue.old, "--config", str(queue.config))
    assert (status, out) == (0, "1 recipient of 1 message released, due now\n")
    assert states(queue, queue.old) == {"erin@example.org": RecipientState.QUEUED}
    assert states(queue, queue.mixed)["bob@example.net"] is RecipientState.HELD


def test_unknown_ids_are_reported_and_the_others_acted_on(
    queue: Queue, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = main(
        capsys, "queue", "hold", "NOPE1", queue.old, "nope2", "--config", str(queue.config)
    )
    assert status == 1
    assert out == "1 recipient of 1 message held\n"
    one_line(err, "mailgate queue hold: not in the queue: NOPE1, NOPE2")
    assert states(queue, queue.old) == {"erin@example.org": RecipientState.HELD}


def test_delete_removes_the_message_and_its_body(
    queue: Queue, capsys: pytest.CaptureFixture[str]
) -> None:
    async def body_exists(store: Any) -> bool:
        # A small body is in the database, a large one a file: read_body finds either.
        try:
            async for _ in store.read_body(queue.old):
                pass
        except KeyError:
            return bool(store.body_path(queue.old).exists())
        return True

    assert queue.read(body_exists)
    status, out, _ = main(capsys, "queue", "delete", queue.old, "--config", str(queue.config))
    assert (status, out) == (0, "1 message deleted\n")

    async def remaining(store: QueueStore) -> list[str]:
        return [message.id for message in await store.list_messages()]

    assert queue.read(remaining) == [queue.mixed, queue.held]
    assert not queue.read(body_exists)


def test_bounce_fails_now_with_a_failure_report_owed(
    queue: Queue, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = main(
        capsys,
        "queue",
        "bounce",
        queue.mixed,
        queue.held,
        "--reason",
        "spam run",
        "--config",
        str(queue.config),
    )
    assert status == 0
    # bob (deferred) and the held bounce's recipient fail; carol had failed already.
    assert out.startswith("2 recipients of 2 messages failed")

    async def notices(store: QueueStore) -> dict[str, list[str]]:
        found = await store.pending_notices()
        return {
            n.message.id: sorted(r.address for r in n.recipients)
            for n in found
            if n.kind == "failure"
        }

    owed = queue.read(notices)
    # One failure report to alice for both bob and carol; none for the null sender.
    assert owed == {queue.mixed: ["bob@example.net", "carol@example.org"]}
    assert states(queue, queue.mixed)["bob@example.net"] is RecipientState.FAILED
    status, out, _ = main(
        capsys, "queue", "show", queue.mixed, "--json", "--config", str(queue.config)
    )
    bob = next(r for r in json.loads(out)["recipients"] if r["address"] == "bob@example.net")
    assert "spam run" in (bob["diagnostic"] or "")


# --- stats -------------------------------------------------------------------------------------


def test_stats_table_by_state_domain_and_age(
    queue: Queue, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = main(capsys, "queue", "stats", "--config", str(queue.config))
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "3 messages in the queue, the oldest 1h30m old"
    assert lines[1] == "recipients: 1 queued, 1 deferred, 1 held, 1 delivered, 1 failed"
    header = lines[4].split()
    assert header == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
    rows = {line.split()[0]: [int(cell) for cell in line.split()[1:]] for line in lines[5:]}
    # example.net: bob (deferred, new) and the held bounce (new); example.org: erin, 90 min.
    assert rows["TOTAL"] == [3, 2, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert rows["example.net"] == [2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert rows["example.org"] == [1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert list(rows) == ["TOTAL", "example.net", "example.org"]


def test_stats_json(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = main(capsys, "queue", "stats", "--json", "--config", str(queue.config))
    assert status == 0
    document = json.loads(out)
    assert document["messages"] == 3
    assert document["recipients"] == {
        "queued": 1,
        "deferred": 1,
        "held": 1,
        "delivered": 1,
        "failed": 1,
    }
    assert document["by_domain"]["example.org"]["by_age"][5] == 1
    assert 5390 < document["oldest_age"] < 5500


# --- problems --------------------------------------------------------------------------------


def test_a_missing_queue_names_the_setting(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = main(capsys, "queue", "list", "--config", str(config))
    assert (status, out) == (3, "")
    one_line(err, "no queue", "spool/queue", f"[queue] path in {config}")


def test_without_queue_path_the_queue_is_under_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.toml"
    path.write_text('[server]\nhostname = "h.example"\nstate_dir = "state"\n')
    status, _, err = main(capsys, "queue", "stats", "--config", str(path))
    assert status == 3
    one_line(err, str(tmp_path / "state" / "queue"), "under [server] state_dir")
    (tmp_path / "state" / "queue").mkdir(parents=True)
    status, out, _ = main(capsys, "queue", "stats", "--config", str(path))
    assert status == 0
    assert out.startswith("0 messages in the queue\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every directory")
def test_an_unreadable_queue(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    queue.directory.chmod(0)
    try:
        status, _, err = main(capsys, "queue", "list", "--config", str(queue.config))
    finally:
        queue.directory.chmod(0o700)
    assert status == 3
    one_line(err, "cannot read the queue at", "Permission denied")


@pytest.mark.skipif(os.geteuid() == 0, reason="as root the process would change user")
def test_a_user_that_cannot_become_the_owner_is_told(
    queue: Queue, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not root really, as root is the only one who may change user: the switch fails.
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    status, _, err = main(capsys, "queue", "hold", queue.old, "--config", str(queue.config))
    assert status == 3
    one_line(err, "belongs to user", "switching to that user failed")
    assert states(queue, queue.old) == {"erin@example.org": RecipientState.QUEUED}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_root_becomes_the_owner_of_the_queue(queue: Queue, tmp_path: Path) -> None:
    """As root, a queue command works as the user owning the queue: everything it
    creates there belongs to that user, so the server (that user) can still write it."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    env = mailgate_env()
    command = mailgate_command("queue", "hold", queue.old)
    stdlib = Path(os.__file__).resolve()
    if any(not path.stat().st_mode & 0o001 for path in stdlib.parents):
        # This Python's library is out of the other user's reach (a pyenv under /root):
        # the system's Python of the same version, with this one's packages, is not.
        system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
        if not system.exists():
            pytest.skip(f"the other user cannot reach this Python's library ({stdlib.parent})")
        packages = os.pathsep.join(site.getsitepackages())
        env["PYTHONPATH"] = f"{env['PYTHONPATH']}{os.pathsep}{packages}"
        command[0] = str(system)
    # A place the other user can reach (pytest's temporary directories are root's only).
    home = Path(tempfile.mkdtemp(prefix="mailgate-owner-", dir="/tmp"))
    try:
        home.chmod(0o755)
        directory = home / "queue"
        shutil.copytree(queue.directory, directory)
        for path in (directory, *directory.rglob("*")):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        config = home / "mailgate.toml"
        config.write_text(
            queue.config.read_text().replace('path = "spool/queue"', f'path = "{directory}"')
        )
        result = subprocess.run(
            [*command, "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "1 recipient of 1 message held\n"
        owners = {path.stat().st_uid for path in (directory, *directory.rglob("*"))}
        assert owners == {nobody.pw_uid}
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_a_damaged_queue(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    database = queue.directory / "queue.db"
    for extra in ("queue.db-wal", "queue.db-shm"):
        (queue.directory / extra).unlink(missing_ok=True)
    database.write_bytes(b"this is not an SQLite database" * 100)
    status, _, err = main(capsys, "queue", "list", "--config", str(queue.config))
    assert status == 3
    one_line(err, "cannot open the queue at", "not a database")


def test_a_bad_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.toml"
    path.write_text('[server]\nhostname = "h.example"\n[queue]\nlifetime = "forever"\n')
    status, _, err = main(capsys, "queue", "list", "--config", str(path))
    assert status == 2
    one_line(err, "mailgate queue: error:", "lifetime")
    status, _, err = main(capsys, "queue", "list", "--config", str(tmp_path / "none.toml"))
    assert status == 2
    one_line(err, "cannot read config file")


def test_a_wrong_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = main(capsys, "queue", "list", "--state", "lost")
    assert status == 2
    one_line(err, "invalid choice: 'lost'")
    status, _, err = main(capsys, "queue", "hold")
    assert status == 2
    one_line(err, "ID")


# --- as a separate process, while a "server" has the queue open ------------------------------


def test_commands_as_processes_are_noticed_by_an_open_store_within_a_second(queue: Queue) -> None:
    """The server keeps its store open; a `mailgate queue hold` in another process wakes its
    wait_for_change well within a second of the command's exit."""
    env = mailgate_env()

    async def scenario() -> tuple[float, dict[str, Any]]:
        async with queue.open() as store:
            await asyncio.sleep(0.3)  # the poller has its first reading
            seen = store.change_count
            process = await asyncio.create_subprocess_exec(
                *mailgate_command("queue", "hold", queue.old, "--config", str(queue.config)),
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await asyncio.wait_for(process.communicate(), 60)
            assert process.returncode == 0, err
            exited = time.monotonic()
            assert await store.wait_for_change(5.0, seen)
            noticed = time.monotonic() - exited
            [message] = await store.list_messages(QueueFilter(ids=(queue.old,)))
            assert message.recipients[0].state is RecipientState.HELD
            listing = await asyncio.create_subprocess_exec(
                *mailgate_command("queue", "list", "--json", "--config", str(queue.config)),
                env=env,
                stdout=asyncio.subprocess.PIPE,
            )
            listed, _ = await asyncio.wait_for(listing.communicate(), 60)
            assert listing.returncode == 0
            return noticed, json.loads(listed)

    noticed, listed = run(scenario())
    assert noticed < 1.0
    assert len(listed["messages"]) == 3


def test_the_installed_command_runs(queue: Queue) -> None:
    # The console script of the venv running the tests (this tree first on PYTHONPATH).
    command = shutil.which("mailgate", path=str(Path(sys.executable).parent))
    if command is None:
        pytest.skip("no mailgate console script beside this Python")
    result = subprocess.run(
        [command, "queue", "stats", "--json", "--config", str(queue.config)],
        env=mailgate_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["messages"] == 3
