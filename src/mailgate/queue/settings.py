"""The ``[queue]`` and ``[outbound]`` tables: each setting declared once, on its field.

``[queue]`` is :class:`QueueSettings` (where the queue lives, how often and how long it
retries); ``[outbound]`` is :class:`~mailgate.queue.outbound.OutboundOptions` itself (how
mailgate talks to other servers). Both are read from the configuration's tables by
:func:`queue_settings` and :func:`outbound_options`, with errors that name the file, the
table and the key, and both are listed in docs/settings.md from these declarations.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

from mailgate.server.options import PolicySection
from mailgate.settings import (
    ConfigError,
    Value,
    build_fields,
    converters,
    did_you_mean,
    setting,
    settings_of,
)

from .outbound.options import OutboundOptions
from .policy import QueuePolicy
from .schedule import DEFAULT_RETRY_SCHEDULE, DurationError, parse_duration

__all__ = [
    "BACKENDS",
    "GROUPS",
    "MIGRATE_MODES",
    "OUTBOUND_TABLE",
    "QUEUE_TABLE",
    "QueueSettings",
    "outbound_options",
    "queue_settings",
    "redacted_dsn",
]

QUEUE_TABLE: Final = "queue"
OUTBOUND_TABLE: Final = "outbound"
#: The reference's headings of these tables' groups.
GROUPS: Mapping[str, str] = {"queue": "queue", "outbound": "outbound"}
#: Where the queue lives under ``state_dir`` when ``[queue] path`` is not given.
DEFAULT_DIRECTORY: Final = "queue"
#: The stores ``[queue] backend`` chooses from: one SQLite file per node (with the
#: bodies as files beside it), or one PostgreSQL database shared by several nodes.
BACKENDS: Final = ("sqlite", "postgresql")
Backend = Literal["sqlite", "postgresql"]
_DSN_SCHEMES: Final = ("postgresql", "postgres")
#: Who brings the queue's schema up to date: the server at start, or the operator.
MIGRATE_MODES: Final = ("auto", "manual")
MigrateMode = Literal["auto", "manual"]
_SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _schema(value: Value) -> str:
    text = converters.string(value)
    if _SCHEMA_NAME.fullmatch(text) is None:
        raise value.error(
            "expected a schema name of lower-case letters, digits and _ (at most 63), "
            "not starting with a digit"
        )
    return text


def _dsn(value: Value) -> str:
    """A PostgreSQL connection URL; the error never echoes it (it may hold a password)."""
    text = converters.string(value).strip()
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme not in _DSN_SCHEMES:
        raise value.error("expected a URL such as postgresql://user:password@host:5432/mailgate")
    return text


def redacted_dsn(dsn: str) -> str:
    """``dsn`` with its password replaced by ``***``: what logs and errors may show."""
    parts = urlsplit(dsn)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    in_query = any(key.lower() == "password" for key, _ in pairs)
    if parts.password is None and not in_query:
        return dsn
    text = dsn
    if parts.password is not None:
        userinfo, _, host = parts.netloc.rpartition("@")
        text = text.replace(parts.netloc, f"{userinfo.partition(':')[0]}:***@{host}", 1)
    if in_query:
        # libpq also takes the password as a query parameter.
        query = urlencode(
            [(key, "***" if key.lower() == "password" else item) for key, item in pairs],
            safe="*/",
        )
        text = text.replace(f"?{parts.query}", f"?{query}", 1)
    return text


def _duration(value: Value) -> float:
    raw = value.raw
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise value.error(f'expected a duration such as "5m" or seconds, got {raw!r}')
    try:
        return parse_duration(raw)
    except DurationError as exc:
        raise value.error(str(exc)) from None


def _durations(value: Value) -> tuple[str, ...]:
    raw = value.raw
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise value.error("needs at least one duration")
    for item in items:
        _duration(Value(item, value.where, value.base))
    return tuple(str(item) for item in items)


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """The ``[queue]`` table: where queued mail is kept and how it is retried."""

    path: Path | None = setting(
        None,
        convert=converters.path,
        help="directory of the queue: its database and one file per message body",
        group="queue",
        metavar="DIR",
        default_text="queue under state_dir",
    )
    retry_schedule: tuple[str, ...] = setting(
        DEFAULT_RETRY_SCHEDULE,
        convert=_durations,
        help="waits between delivery attempts, the last one repeating; each is varied by "
        "up to 10 % so deferred mail does not return in one wave",
        group="queue",
        metavar="[DURATION, ...]",
    )
    lifetime: float = setting(
        5 * 86400.0,
        convert=_duration,
        help="how long a message is retried before it is returned to its sender",
        group="queue",
        metavar="DURATION",
        default_text="5d",
    )
    bounce_lifetime: float | None = setting(
        None,
        convert=_duration,
        help="the same for delivery reports and other mail from <> (which is never returned)",
        group="queue",
        metavar="DURATION",
        default_text="lifetime",
    )
    delay_warning: float | None = setting(
        None,
        convert=_duration,
        help="after this long undelivered, tell the sender once that delivery is delayed",
        group="queue",
        metavar="DURATION",
        default_text="off",
    )
    max_deliveries: int = setting(
        100,
        convert=converters.count,
        help="delivery attempts in progress at once, over every destination",
        group="queue",
        metavar="N",
    )
    destination_concurrency: int = setting(
        0,
        convert=converters.count_or_zero,
        help="deliveries in progress at once to one destination (a domain's MX, or a "
        "forward rule's server) over every node and process sharing this queue; 0: no "
        "shared cap, only [outbound] max_concurrency_per_destination in each process",
        group="queue",
        metavar="N",
        default_text="0 (off)",
    )
    backend: Backend = setting(
        "sqlite",
        convert=converters.choice(BACKENDS),
        help="where queued mail is kept: sqlite (in path, this node only) or postgresql "
        "(the database of dsn, shared by every node using it; needs the postgresql extra)",
        group="queue",
        choices=BACKENDS,
    )
    dsn: str | None = setting(
        None,
        convert=_dsn,
        help="the PostgreSQL database of backend = postgresql, as a URL "
        "(postgresql://user:password@host:5432/name); its password is never logged",
        group="queue",
        metavar="URL",
        default_text="none; required with backend = postgresql",
    )

    schema: str = setting(
        "mailgate",
        convert=_schema,
        help="the PostgreSQL schema holding the queue's tables (backend = postgresql); "
        "several queues may share one database in different schemas",
        group="queue",
        metavar="NAME",
    )
    migrate: MigrateMode = setting(
        "auto",
        convert=converters.choice(MIGRATE_MODES),
        help="auto: serve and sendmail create or update the queue's schema at start "
        "(nodes starting at once take turns); manual: only 'mailgate queue migrate' does, "
        "and a node finding an older schema refuses to start (advised with many nodes)",
        group="queue",
        choices=MIGRATE_MODES,
    )

    def __repr__(self) -> str:
        # The DSN may carry a password: a logged or printed settings object hides it.
        fields = ", ".join(
            f"{item.key}={redacted_dsn(value) if item.key == 'dsn' and value else value!r}"
            for item in settings_of(QueueSettings)
            for value in (getattr(self, item.key),)
        )
        return f"QueueSettings({fields})"

    def directory(self, state_dir: Path) -> Path:
        """The queue's directory: ``path``, else ``queue`` under the state directory."""
        return self.path if self.path is not None else state_dir / DEFAULT_DIRECTORY

    def policy(self) -> QueuePolicy:
        """The store's retry rules."""
        return QueuePolicy.from_settings(
            retry_schedule=self.retry_schedule,
            lifetime=self.lifetime,
            bounce_lifetime=self.bounce_lifetime,
            delay_warning=self.delay_warning,
        )


def _sections(sections: Iterable[PolicySection], name: str) -> list[PolicySection]:
    return [section for section in sections if section.name == name]


def _values(section: PolicySection, known: list[str]) -> dict[str, Value]:
    values: dict[str, Value] = {}
    for key, raw in section.values.items():
        if key not in known:
            raise ConfigError(f"{section.source}: unknown key {key!r}{did_you_mean(key, known)}")
        values[key] = Value(raw, f"{section.source} {key}", section.base)
    return values


def queue_settings(sections: Iterable[PolicySection]) -> QueueSettings:
    """The ``[queue]`` table of the configuration (defaults when there is none)."""
    found = _sections(sections, QUEUE_TABLE)
    if not found:
        return QueueSettings()
    keys = [item.key for item in settings_of(QueueSettings)]
    section = found[0]
    values = _values(section, keys)
    settings = QueueSettings(**build_fields(QueueSettings, values, table=QUEUE_TABLE))
    if settings.backend == "postgresql" and settings.dsn is None:
        raise ConfigError(
            f'{section.source} dsn: required with backend = "postgresql" '
            "(postgresql://user:password@host:5432/name)"
        )
    return settings


def outbound_options(sections: Iterable[PolicySection], hostname: str) -> OutboundOptions:
    """The ``[outbound]`` table as the engine's options; ``helo`` defaults to the server's
    host name."""
    found = _sections(sections, OUTBOUND_TABLE)
    values = _values(found[0], [item.key for item in settings_of(OutboundOptions)]) if found else {}
    fields = build_fields(OutboundOptions, values, table=OUTBOUND_TABLE)
    fields.setdefault("helo", hostname)
    try:
        return OutboundOptions(**fields)
    except ValueError as exc:
        raise ConfigError(f"{found[0].source}: {exc}") from None
