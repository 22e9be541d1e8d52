"""``mailgate queue migrate`` and who changes the queue's schema: the commands that read
or change the queue never do (an unmigrated or older schema is one error line saying to
run the migration); ``serve`` and ``sendmail`` do when ``[queue] migrate = "auto"`` (the
default), never with ``"manual"``. Both backends; PostgreSQL in a non-default
``[queue] schema`` on the suite's private cluster."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.cli.conftest import Stdin

from mailgate import cli
from mailgate.queue import QueueError
from mailgate.queue import sqlite as sqlite_queue
from mailgate.queue.plugin import open_store
from mailgate.queue.settings import QueueSettings


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def sendmail(monkeypatch: pytest.MonkeyPatch, config: str) -> int:
    monkeypatch.setattr("sys.stdin", Stdin(b"Subject: nightly\n\nAll good.\n"))
    return cli.main(["sendmail", "--config", config, "-f", "a@example.org", "b@example.net"])


def single_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# --- PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture
def pg_schema(postgres_dsn: str) -> Iterator[str]:
    pytest.importorskip("asyncpg")
    name = f"mg_{secrets.token_hex(4)}"
    yield name
    asyncio.run(_sql(postgres_dsn, f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


async def _sql(dsn: str, statement: str, *args: object) -> list[tuple[object, ...]]:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        return [tuple(row) for row in await connection.fetch(statement, *args)]
    finally:
        await connection.close()


def _pg_config(tmp_path: Path, dsn: str, schema: str, migrate: str = "auto") -> Path:
    config = tmp_path / "mailgate.toml"
    config.write_text(
        '[server]\nhostname = "mx.example.test"\nlisten = "127.0.0.1:0"\nstate_dir = "state"\n'
        f'[queue]\nbackend = "postgresql"\ndsn = "{dsn}"\nschema = "{schema}"\n'
        f'migrate = "{migrate}"\n'
        '[[routes]]\nrecipients = ["*"]\naction = "relay"\n'
    )
    return config


def test_postgres_migrate_command_in_a_named_schema(
    tmp_path: Path, postgres_dsn: str, pg_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from mailgate.queue.postgres import SCHEMA_VERSION

    config = str(_pg_config(tmp_path, postgres_dsn, pg_schema))
    # Nothing yet: the reading commands say what to do and create nothing.
    for command in (["list"], ["stats"], ["show", "X"], ["flush"]):
        status, out, err = run_cli(capsys, "queue", *command, "--config", config)
        line = single_line(err)
        assert status == 3 and not out, (command, err)
        assert f"version 0, this mailgate needs {SCHEMA_VERSION}" in line
        assert "run 'mailgate queue migrate'" in line
    assert (
        asyncio.run(_sql(postgres_dsn, "SELECT 1 FROM pg_namespace WHERE nspname = $1", pg_schema))
        == []
    )

    status, out, err = run_cli(capsys, "queue", "migrate", "--status", "--config", config)
    assert status == 1, err
    assert single_line(out) == (
        f"queue schema {pg_schema!r} of {postgres_dsn}: schema version 0; "
        f"this mailgate uses {SCHEMA_VERSION}: a migration is due"
    )
    status, out, err = run_cli(capsys, "queue", "migrate", "--config", config)
    assert status == 0, err
    assert single_line(out).endswith(f"schema migrated from version 0 to {SCHEMA_VERSION}")
    # Idempotent.
    status, out, err = run_cli(capsys, "queue", "migrate", "--config", config)
    assert status == 0, err
    assert single_line(out).endswith(f"schema version {SCHEMA_VERSION}, up to date; nothing to do")
    status, out, _ = run_cli(capsys, "queue", "migrate", "--status", "--config", config)
    assert status == 0 and out.strip().endswith("up to date")

    # Every table is in the configured schema, none in the default one.
    tables = asyncio.run(
        _sql(
            postgres_dsn,
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema IN ($1, 'mailgate') ORDER BY table_name",
            pg_schema,
        )
    )
    assert {schema for schema, _ in tables} == {pg_schema}
    assert {name for _, name in tables} >= {"messages", "recipients", "bodies", "history", "nodes"}

    status, out, err = run_cli(capsys, "queue", "list", "--json", "--config", config)
    assert status == 0, err
    assert '"messages": []' in out


def test_postgres_older_schema_manual_and_auto(
    tmp_path: Path,
    postgres_dsn: str,
    pg_schema: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mailgate.queue.postgres import SCHEMA_VERSION, migrate

    assert SCHEMA_VERSION >= 2
    # A database left by the previous mailgate.
    assert asyncio.run(migrate(postgres_dsn, schema=pg_schema, to_version=1)) == 1
    config = str(_pg_config(tmp_path, postgres_dsn, pg_schema, migrate="manual"))
    status, out, err = run_cli(capsys, "queue", "stats", "--config", config)
    assert status == 3 and not out
    assert "version 1, this mailgate needs" in single_line(err)
    assert "run 'mailgate queue migrate'" in err

    settings = QueueSettings(
        backend="postgresql", dsn=postgres_dsn, schema=pg_schema, migrate="manual"
    )
    # A node configured "manual" does not start on the older schema...
    with pytest.raises(QueueError, match=r"version 1, this mailgate needs .*queue migrate"):
        asyncio.run(open_store(settings, tmp_path / "spool"))
    # ... nor does sendmail queue into it.
    status = sendmail(monkeypatch, config)
    assert status != 0
    assert "run 'mailgate queue migrate'" in capsys.readouterr().err

    # "auto": three nodes starting at once on the older schema; one migration runs.
    auto = QueueSettings(backend="postgresql", dsn=postgres_dsn, schema=pg_schema)

    async def three_nodes() -> None:
        stores = await asyncio.gather(*(open_store(auto, tmp_path / f"spool{n}") for n in range(3)))
        for store in stores:
            await store.aclose()

    asyncio.run(three_nodes())
    versions = asyncio.run(
        _sql(postgres_dsn, f'SELECT version FROM "{pg_schema}".schema_version ORDER BY version')
    )
    assert [row[0] for row in versions] == list(range(1, SCHEMA_VERSION + 1))
    status, out, err = run_cli(capsys, "queue", "stats", "--config", config)
    assert status == 0, err


def test_a_bad_schema_name_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "mailgate.toml"
    config.write_text(
        '[queue]\nbackend = "postgresql"\ndsn = "postgresql://127.0.0.1/x"\nschema = "Mail-Gate"\n'
    )
    status, _, err = run_cli(capsys, "queue", "migrate", "--config", str(config))
    assert status == 2
    assert "schema" in single_line(err) and "lower-case" in err
    config.write_text('[queue]\nmigrate = "sometimes"\n')
    status, _, err = run_cli(capsys, "queue", "list", "--config", str(config))
    assert status == 2 and "auto, manual" in single_line(err)


# --- SQLite ---------------------------------------------------------------------------------


def _sqlite_config(tmp_path: Path, migrate: str = "auto") -> Path:
    config = tmp_path / "mailgate.toml"
    config.write_text(
        f'[queue]\npath = "{tmp_path / "queue"}"\nmigrate = "{migrate}"\n'
        '[[routes]]\nrecipients = ["*"]\naction = "relay"\n'
    )
    return config


def test_sqlite_migrate_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = str(_sqlite_config(tmp_path, migrate="manual"))
    version = sqlite_queue.SCHEMA_VERSION
    status, out, _ = run_cli(capsys, "queue", "migrate", "--status", "--config", config)
    assert status == 1 and "schema version 0" in out and "a migration is due" in out
    assert not (tmp_path / "queue").exists()  # --status creates nothing

    # "manual": sendmail does not create the queue.
    status = sendmail(monkeypatch, config)
    assert status != 0
    assert "run 'mailgate queue migrate'" in single_line(capsys.readouterr().err)

    status, out, err = run_cli(capsys, "queue", "migrate", "--config", config)
    assert status == 0, err
    assert single_line(out) == (
        f"queue {tmp_path / 'queue'}: schema migrated from version 0 to {version}"
    )
    status, out, _ = run_cli(capsys, "queue", "migrate", "--config", config)
    assert status == 0 and out.strip().endswith("up to date; nothing to do")
    status, out, err = run_cli(capsys, "queue", "list", "--json", "--config", config)
    assert status == 0, err

    # A database from a newer mailgate: refused by every command, migrate included.
    database = sqlite3.connect(tmp_path / "queue" / "queue.db")
    with database:
        database.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version + 1),)
        )
    database.close()
    for command in (["list"], ["migrate"]):
        status, _, err = run_cli(capsys, "queue", *command, "--config", config)
        assert status == 3 and "newer than this mailgate's" in single_line(err), command


def test_sqlite_reading_commands_never_create_the_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = str(_sqlite_config(tmp_path))
    (tmp_path / "queue").mkdir()
    (tmp_path / "queue" / "leftover").write_text("")  # not empty, yet no database
    status, _, err = run_cli(capsys, "queue", "stats", "--config", config)
    assert status == 3
    assert "version 0" in single_line(err) and "run 'mailgate queue migrate'" in err
    assert not (tmp_path / "queue" / "queue.db").exists()
    # "auto" (the default): sendmail creates it, like serve.
    status = sendmail(monkeypatch, config)
    assert status == 0, capsys.readouterr().err
    assert sqlite_queue.schema_version(tmp_path / "queue") == sqlite_queue.SCHEMA_VERSION
