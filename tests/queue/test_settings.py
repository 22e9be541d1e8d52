"""[queue], [outbound] and [[routes]] read from a configuration file: values, defaults,
and errors that name the file, the table and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.cli import build_parser
from mailgate.config import ConfigError, build_options
from mailgate.queue.settings import (
    QueueSettings,
    outbound_options,
    queue_settings,
    redacted_dsn,
)
from mailgate.server.options import ServerOptions


def load(tmp_path: Path, body: str) -> ServerOptions:
    path = tmp_path / "mailgate.toml"
    path.write_text(body)
    return build_options(build_parser().parse_args(["serve", "--config", str(path)]))


def test_without_tables_the_defaults(tmp_path: Path) -> None:
    options = load(tmp_path, '[server]\nhostname = "mx.example.net"\nstate_dir = "state"\n')
    settings = queue_settings(options.policy)
    assert settings == QueueSettings()
    assert settings.directory(options.state_dir) == tmp_path / "state" / "queue"
    assert settings.policy().lifetime == 5 * 86400
    assert [round(d) for d in settings.policy().schedule.delays] == [300, 600, 1200, 2400, 3960]
    outbound = outbound_options(options.policy, options.hostname)
    assert outbound.helo == "mx.example.net" and outbound.port == 25


def test_values_and_relative_path(tmp_path: Path) -> None:
    options = load(
        tmp_path,
        '[server]\nhostname = "mx.example.net"\n'
        '[queue]\npath = "q"\nretry_schedule = ["1m", "90s"]\nlifetime = "2d"\n'
        'bounce_lifetime = "1d"\ndelay_warning = "4h"\nmax_deliveries = 7\n'
        '[outbound]\nhelo = "out.example.net"\nport = 2526\ntls_policy = "encrypt"\n'
        "max_concurrency_per_destination = 3\ninitial_concurrency = 2\n",
    )
    settings = queue_settings(options.policy)
    assert settings.path == tmp_path / "q"
    assert settings.retry_schedule == ("1m", "90s")
    assert (settings.lifetime, settings.bounce_lifetime, settings.delay_warning) == (
        2 * 86400,
        86400,
        4 * 3600,
    )
    assert settings.max_deliveries == 7
    policy = settings.policy()
    assert [round(d) for d in policy.schedule.delays] == [60, 90]
    outbound = outbound_options(options.policy, options.hostname)
    assert (outbound.helo, outbound.port, outbound.tls_policy) == (
        "out.example.net",
        2526,
        "encrypt",
    )
    assert (outbound.max_concurrency_per_destination, outbound.initial_concurrency) == (3, 2)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            '[queue]\nretry_shedule = ["5m"]\n',
            "[queue]: unknown key 'retry_shedule' (did you mean 'retry_schedule'?)",
        ),
        ('[queue]\nlifetime = "soon"\n', "[queue] lifetime:"),
        ("[queue]\nretry_schedule = []\n", "[queue] retry_schedule: needs at least one duration"),
        ("[outbound]\nport = 70000\n", "[outbound]: outbound port 70000 is out of range"),
        ('[outbound]\ntls_policy = "always"\n', "[outbound] tls_policy: 'always' is not one of"),
        (
            '[outbound.tls_policies]\n"example.com" = "strict"\n',
            "[outbound] tls_policies: example.com: 'strict' is not one of none, may, encrypt, verify",
        ),
        ('[outbound.tls_policies]\n"not a domain" = "verify"\n', "'not a domain' is not a domain"),
        ('[outbound]\ntls_policies = "verify"\n', "[outbound] tls_policies: must be a table"),
        ("[outbound]\nmta_sts = 1\n", "[outbound] mta_sts:"),
        ("[outbound]\ninitial_concurrency = 30\n", "initial_concurrency must be between"),
        ('[[routes]]\nrecipients = ["*"]\naction = "forward"\n', "[[routes]] #1"),
        ('[routes]\nrecipients = ["*"]\naction = "relay"\n', "routes must be an array of tables"),
        (
            '[queue]\nbackend = "mysql"\n',
            "[queue] backend: 'mysql' is not one of sqlite, postgresql",
        ),
        ('[queue]\nbackend = "postgresql"\n', "[queue] dsn: required with backend"),
        ('[queue]\ndsn = "mysql://db/queue"\n', "[queue] dsn: expected a URL such as"),
    ],
)
def test_errors_name_file_table_and_key(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, body)
    assert str(raised.value).startswith(str(tmp_path / "mailgate.toml"))
    assert message in str(raised.value)


def test_tls_policies_per_domain_and_mta_sts(tmp_path: Path) -> None:
    options = load(
        tmp_path,
        '[outbound]\ntls_policy = "verify"\nmta_sts = false\n'
        '[outbound.tls_policies]\n"Example.COM" = "encrypt"\n".bücher.example" = "dane"\n'
        '"legacy.example" = "none"\n',
    )
    outbound = outbound_options(options.policy, "mx.example.net")
    assert outbound.tls_policy == "verify" and outbound.mta_sts is False
    assert outbound.tls_policies == (
        ("example.com", "encrypt"),
        (".xn--bcher-kva.example", "dane"),
        ("legacy.example", "none"),
    )
    assert outbound.mta_sts_port == 443 and outbound.mta_sts_cache_file is None
    defaults = outbound_options(load(tmp_path, "").policy, "mx.example.net")
    assert (defaults.tls_policy, defaults.tls_policies, defaults.mta_sts) == ("may", (), True)


def test_the_postgresql_backend(tmp_path: Path) -> None:
    dsn = "postgresql://mailgate:s3cret@db.example.net:5432/mail?sslmode=require"
    options = load(tmp_path, f'[queue]\nbackend = "PostgreSQL"\ndsn = "{dsn}"\n')
    settings = queue_settings(options.policy)
    assert (settings.backend, settings.dsn) == ("postgresql", dsn)
    # What may be logged or printed of the settings never holds the password.
    assert "s3cret" not in repr(settings)
    assert "dsn='postgresql://mailgate:***@db.example.net:5432/mail?sslmode=require'" in repr(
        settings
    )


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        ("postgresql:///db?host=/run/pg&password=pw", "postgresql:///db?host=/run/pg&password=***"),
        ("postgres://u@h:5433/db", "postgres://u@h:5433/db"),
    ],
)
def test_redacted_dsn(dsn: str, shown: str) -> None:
    assert redacted_dsn(dsn) == shown


def test_a_wrong_dsn_is_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, '[queue]\ndsn = "host=db password=s3cret"\n')
    assert "[queue] dsn:" in str(raised.value)
    assert "s3cret" not in str(raised.value)
