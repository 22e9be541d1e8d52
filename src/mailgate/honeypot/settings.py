"""Honeypot mode's settings: :class:`HoneypotOptions` (the ``[honeypot]`` table and the
``mailgate honeypot`` flags, each declared once on its field), the ``[server]`` settings
the honeypot command offers as flags, and those it refuses.

mailgate.config reads files and flags through these tables; mailgate.honeypot.mode turns
the result into a server.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mailgate.server.options import PolicySection
from mailgate.settings import (
    ConfigError,
    Network,
    Value,
    code_only,
    converters,
    required,
    setting,
)

__all__ = [
    "AUTH_OUTCOMES",
    "GROUPS",
    "HONEYPOT_REFUSED",
    "HONEYPOT_REFUSED_TABLES",
    "PERSONA_CHOICES",
    "REFUSED_FLAGS",
    "RELAY_MODES",
    "SERVER_FLAGS",
    "HoneypotOptions",
    "check_policy_overlap",
    "env_name_setting",
    "llm_url_setting",
    "model_name_setting",
    "parse_auth_outcome",
    "refuse_tables",
]

AUTH_OUTCOMES: Final = ("refuse", "accept", "accept-after:N")
RELAY_MODES: Final = ("refuse", "pretend")
#: The built-in personas (mailgate.honeypot.personas.PERSONAS has them; listed here so
#: that reading a configuration does not load them).
PERSONA_CHOICES: Final = ("postfix", "exim", "exchange", "sendmail", "generic")
GROUPS: Mapping[str, str] = {
    "honeypot": "honeypot",
    "identity": "honeypot: generated identity",
}
#: The longest wait for one answer of the language model (a start must stay bounded).
MAX_LLM_TIMEOUT: Final = 600.0


def parse_auth_outcome(value: str) -> tuple[str, int]:
    """``"refuse"`` -> ("refuse", 0), ``"accept"`` -> ("accept", 0), ``"accept-after:N"``
    -> ("accept-after", N) with N >= 1; anything else is a ValueError saying what works."""
    text = str(value).strip().lower()
    if text in ("refuse", "accept"):
        return text, 0
    match = re.fullmatch(r"accept-after:\s*(\d+)", text)
    if match and int(match[1]) >= 1:
        return "accept-after", int(match[1])
    raise ValueError(
        f"auth_outcome must be refuse, accept or accept-after:N (N >= 1), not {value!r}"
    )


def _auth_outcome(value: Value) -> str:
    try:
        mode, count = parse_auth_outcome(converters.string(value))
    except ValueError as exc:
        raise value.error(str(exc).replace("auth_outcome must be", "must be")) from None
    return f"{mode}:{count}" if count else mode


def _rate(value: Value) -> str:
    # Imported here: the rate limits plugin loads the hooks, which reading flags for
    # --help or an error does not need.
    from mailgate.plugins.rate_limits import Rate

    text = converters.string(value).strip()
    try:
        Rate.parse(text)
    except ValueError as exc:
        raise value.error(str(exc)) from None
    return text


def llm_url_setting(value: Value) -> str:
    """The base URL of an OpenAI-compatible API (``http(s)://host[:port]/v1``)."""
    text = converters.string(value).strip()
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise value.error(
            f"{text!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:11434/v1)"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise value.error(f"{text!r} has no valid port number") from None
    return text


def model_name_setting(value: Value) -> str:
    text = converters.string(value).strip()
    if not text or len(text) > 200 or not text.isprintable():
        raise value.error(f"{text!r} is not a model name")
    return text


def env_name_setting(value: Value) -> str:
    text = converters.string(value).strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text):
        raise value.error(f"{text!r} is not an environment variable name")
    return text


def _llm_timeout(value: Value) -> float:
    seconds = converters.seconds(value)
    if seconds > MAX_LLM_TIMEOUT:
        raise value.error(f"at most {MAX_LLM_TIMEOUT:g} seconds, got {seconds:g}")
    return seconds


def _seconds_or_off(value: Value) -> float | None:
    return converters.seconds_or_zero(value) or None


def _size_or_off(value: Value) -> int | None:
    return converters.size(value) or None


_USER = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*")


def _users(value: Value) -> tuple[str, ...]:
    users = [u.strip() for text in converters.string_list(value) for u in text.split(",")]
    for user in users:
        if not _USER.fullmatch(user) or len(user) > 64:
            raise value.error(f"{user!r} is not a user name (the local part of an address)")
    return tuple(dict.fromkeys(u.lower() for u in users))


#: A full name as a password file's GECOS gives it (the personas' full_names): printable
#: ASCII without a comma or angle brackets.
_FULL_NAME = re.compile(r"[ -+\--;=?-~]{1,80}")
#: An alias target: a user name or an address (no spaces, brackets or controls).
_ALIAS_TARGET = re.compile(r"[!-;=?-~]{1,254}")


def _named_entries(value: Value, what: str) -> list[tuple[str, str]]:
    """``NAME: TEXT`` entries (as /etc/aliases writes them), NAME a user name."""
    out = []
    for entry in converters.string_list(value):
        name, colon, text = entry.partition(":")
        name, text = name.strip(), text.strip()
        if not colon or not _USER.fullmatch(name) or len(name) > 64 or not text:
            raise value.error(f"{entry!r} is not {what}")
        out.append((name.lower(), text))
    return out


def _full_names(value: Value) -> tuple[tuple[str, str], ...]:
    pairs = _named_entries(value, "USER: Full Name")
    for _user, name in pairs:
        if not _FULL_NAME.fullmatch(name):
            raise value.error(f"{name!r}: a full name is printable ASCII without , < or >")
    return tuple(pairs)


def _aliases(value: Value) -> tuple[tuple[str, tuple[str, ...]], ...]:
    out = []
    for alias, text in _named_entries(value, "ALIAS: TARGET[, TARGET...]"):
        targets = tuple(t.strip() for t in text.split(","))
        for target in targets:
            if not _ALIAS_TARGET.fullmatch(target):
                raise value.error(f"{alias}: {target!r} is not a user name or an address")
        out.append((alias, targets))
    return tuple(out)


def _domains(value: Value) -> tuple[str, ...]:
    domains = converters.domain_patterns(value)
    for domain in domains:
        if domain.startswith("*."):
            raise value.error(f"{domain!r}: give each domain by name (no *.)")
    return domains


@dataclass(frozen=True, slots=True)
class HoneypotOptions:
    """The settings of honeypot mode besides the server's (the [honeypot] table and the
    ``mailgate honeypot`` flags). mailgate.honeypot.mode turns them into a server."""

    #: Where everything is stored: the capture database, raw messages, the TLS certificate,
    #: the spool.
    data_dir: Path = required(
        convert=converters.path,
        group="honeypot",
        metavar="DIR",
        help="where everything is stored: capture.sqlite3, messages/, the TLS certificate "
        "and the spool",
        missing="honeypot mode needs a data directory",
    )
    #: A built-in persona (PERSONA_CHOICES); the base of ``profile`` when one is given.
    persona: str = setting(
        "postfix",
        convert=converters.choice(PERSONA_CHOICES),
        group="honeypot",
        choices=PERSONA_CHOICES,
        help="the product to look like; also the base of --profile",
    )
    #: A TOML persona profile (mailgate.honeypot.personas.load_profile).
    profile: Path | None = setting(
        None,
        convert=converters.path,
        group="honeypot",
        metavar="FILE",
        help="a TOML persona profile overriding any text of the persona",
    )
    #: JSON lines of every event: a file to append to, "-" for stdout, None for none.
    jsonl: str | None = setting(
        None,
        convert=converters.path_or_stdout,
        group="honeypot",
        metavar="FILE|-",
        help="also write every event as a JSON line to FILE (appended) or stdout (-)",
    )
    #: refuse | accept | accept-after:N
    auth_outcome: str = setting(
        "refuse",
        convert=_auth_outcome,
        group="honeypot",
        metavar="|".join(AUTH_OUTCOMES),
        help="answer AUTH: refuse all, accept all, or accept the Nth attempt from an address "
        "and later ones",
    )
    drop_after_credentials: bool = setting(
        False,
        convert=converters.boolean,
        group="honeypot",
        switch=True,
        help="after recording a credential answer 535 and hang up",
    )
    #: Seconds before each answer, times the connections seen from the address (0: off).
    tarpit: float = setting(
        0.0,
        convert=converters.seconds_or_zero,
        group="honeypot",
        metavar="SECONDS",
        help="wait this long before each answer, times the connections seen from the "
        "address (at most 10 s)",
        default_text="{default}, off",
    )
    #: The longest session in seconds (None: no limit).
    max_session: float | None = setting(
        600.0,
        convert=_seconds_or_off,
        group="honeypot",
        metavar="SECONDS",
        help="close sessions older than this with the persona's timeout reply; 0 for no limit",
    )
    #: Cap on the capture store (database, raw messages, messages in flight); None: no cap.
    max_storage: int | None = setting(
        1024**3,
        convert=_size_or_off,
        group="honeypot",
        metavar="SIZE",
        help="cap on the capture store (database, raw messages and messages being "
        "received); the oldest finished sessions are pruned, then DATA is refused with "
        "the persona's 452; suffixes K, M, G; 0 for no cap",
        describe=converters.size_text,
    )
    #: CPU seconds the analysis of one message (subject, URLs, attachments) may take;
    #: None: no limit. What was found when it runs out is kept, marked as cut short.
    analysis_budget: float | None = setting(
        2.0,
        convert=_seconds_or_off,
        group="honeypot",
        metavar="SECONDS",
        help="CPU seconds the analysis of one message may take (what it found by then is "
        "kept, marked as cut short); 0 for no limit",
    )
    #: MIME parts of one message analysed at most.
    analysis_max_parts: int = setting(
        1000,
        convert=converters.count,
        group="honeypot",
        metavar="N",
        help="analyse at most this many MIME parts of a message",
    )
    #: Nesting levels of multipart parts and attached messages analysed at most.
    analysis_max_depth: int = setting(
        50,
        convert=converters.count,
        group="honeypot",
        metavar="N",
        help="analyse MIME parts nested at most this many levels deep",
    )
    #: Clients refused at connect (the lists policy's block_networks).
    block_networks: tuple[Network, ...] = setting(
        (),
        convert=converters.networks,
        group="honeypot",
        metavar="CIDR[,CIDR]",
        repeatable=True,
        help="refuse clients in these networks at connect",
    )
    #: New connections per client IP, "N/WINDOW" (the rate limits' connections_per_ip).
    connections_per_ip: str | None = setting(
        None,
        convert=_rate,
        group="honeypot",
        metavar="N/WINDOW",
        help="refuse a client's connections beyond N per WINDOW (e.g. 30/10m) with the "
        "persona's 421",
        default_text="no limit",
    )
    #: What RCPT to a domain that is not the persona's gets: the persona's relay refusal
    #: (refuse), or accepted and captured like local mail (pretend); nothing is ever relayed.
    relay: str = setting(
        "refuse",
        convert=converters.choice(RELAY_MODES),
        group="honeypot",
        choices=RELAY_MODES,
        help="RCPT to other domains: refuse with the persona's relay denial (as the product "
        "does by default), or pretend to relay (accept and capture; nothing is ever relayed)",
    )
    #: Users that exist at the persona's domains (None: the persona's own list).
    local_users: tuple[str, ...] | None = setting(
        None,
        convert=_users,
        group="honeypot",
        metavar="USER[,USER]",
        repeatable=True,
        help="users that exist at the persona's domains; RCPT to others gets the product's "
        "unknown-user refusal",
        default_text="the persona's (root, postmaster, admin, the product's system users)",
    )
    #: Full names (GECOS) of local users, added to the persona's: what VRFY/EXPN show
    #: for a persona that answers them from its users (sendmail).
    full_names: tuple[tuple[str, str], ...] = setting(
        (),
        convert=_full_names,
        group="honeypot",
        metavar="USER: FULL NAME",
        repeatable=True,
        help="a local user's full name as the password file gives it, added to the "
        "persona's (shown by VRFY/EXPN where the product shows it, as Sendmail does)",
        default_text="the persona's (sendmail: Debian's system users)",
    )
    #: Aliases (/etc/aliases), added to the persona's: valid recipients, expanded by EXPN.
    aliases: tuple[tuple[str, tuple[str, ...]], ...] = setting(
        (),
        convert=_aliases,
        group="honeypot",
        metavar="ALIAS: TARGET[, TARGET...]",
        repeatable=True,
        help="an alias as /etc/aliases writes it, added to the persona's: a valid "
        "recipient, and EXPN expands it where the product does (Sendmail)",
        default_text="the persona's (sendmail: none, as on a stock Debian install)",
    )
    #: Domains the persona receives mail for (empty: the host name, its parent domain,
    #: localhost and localhost.localdomain).
    domains: tuple[str, ...] = setting(
        (),
        convert=_domains,
        group="honeypot",
        metavar="DOMAIN[,DOMAIN]",
        repeatable=True,
        help="domains the persona receives mail for; mail to others is relaying",
        default_text="the host name, its parent domain, localhost, localhost.localdomain",
    )
    #: Generate a site identity with a language model at the first start and keep it in
    #: the data directory (mailgate.honeypot.identity).
    generate_identity: bool = setting(
        False,
        convert=converters.boolean,
        group="identity",
        switch=True,
        help="at the first start ask a language model (--llm-url, --model) for a site "
        "identity within the persona's conventions (host name, banner variant, version, "
        "local users, timing) and keep it in DATA_DIR/identity.toml for later starts; "
        "the persona as it is when that fails",
    )
    #: Base URL of the OpenAI-compatible chat-completions API.
    llm_url: str | None = setting(
        None,
        convert=llm_url_setting,
        group="identity",
        metavar="URL",
        help="base URL of an OpenAI-compatible API: OpenAI (https://api.openai.com/v1), "
        "Ollama (http://127.0.0.1:11434/v1), llama.cpp's server or vLLM (http://HOST:PORT/v1)",
        default_text="none",
    )
    #: The model to ask.
    llm_model: str | None = setting(
        None,
        convert=model_name_setting,
        group="identity",
        flags=("--model",),
        metavar="NAME",
        help="the model to ask (e.g. gpt-4o-mini, llama3.1)",
        default_text="none",
    )
    #: Environment variable holding the API key (None: no key is sent).
    llm_api_key_env: str | None = setting(
        None,
        convert=env_name_setting,
        group="identity",
        flags=("--api-key-env",),
        metavar="VAR",
        help="the environment variable holding the API key (the key itself is never in "
        "a file or on the command line)",
        default_text="no key",
    )
    #: Seconds one request may take; at most three are made.
    llm_timeout: float = setting(
        60.0,
        convert=_llm_timeout,
        group="identity",
        metavar="SECONDS",
        help="seconds one request to the model may take (at most 3 attempts)",
    )
    #: The domain generated host names must be in (None: the model invents one).
    identity_domain: str | None = setting(
        None,
        convert=converters.hostname,
        group="identity",
        metavar="DOMAIN",
        help="put the generated host name under this domain (yours: the name the "
        "address's reverse DNS shows should be in it)",
        default_text="invented by the model",
    )
    #: The [server] keys given by the file or flags; the persona fills in the others
    #: (host name, SIZE, SASL mechanisms).
    given: frozenset[str] = code_only(
        frozenset(), reason="which [server] settings were given, noted by mailgate.config"
    )


#: The ``mailgate serve`` settings that ``mailgate honeypot`` offers as flags too, each
#: with what its default is in a honeypot (None: as for serve). Any [server] key not
#: refused below works in a honeypot's file.
SERVER_FLAGS: Mapping[str, str | None] = {
    "listen": None,
    "smtps_listen": None,
    "hostname": "the persona's, e.g. mail.example.com",
    "tls_cert": "a self-signed certificate made in --data-dir",
    "tls_key": None,
    "max_size": "the persona's",
    "max_clients": None,
    "max_clients_per_ip": None,
    "idle_timeout": None,
    "greeting_delay": None,
    "proxy_protocol": None,
    "auth_mechanisms": "the persona's",
    "auth_failure_delay": None,
    "max_auth_failures": "the persona's (postfix: 20), else 3",
    "log_format": None,
    "verbose": None,
    "quiet": None,
    "admin_listen": None,
    "admin_token_file": None,
}

_NO_DELIVERY = "a honeypot never delivers or hands on mail (everything stays in its data_dir)"
_OWN_AUTH = "a honeypot answers AUTH itself (auth_outcome in [honeypot], --auth-outcome)"
_EVERY_DOMAIN = "a honeypot accepts mail for every domain and relays none"
_NO_SUBMISSION = (
    "a honeypot takes every AUTH and sender; for ports 587 and 465 use listen and smtps_listen"
)
#: [server] settings a honeypot refuses, in its file and as flags, with the reason.
HONEYPOT_REFUSED: Mapping[str, str] = {
    "maildir": _NO_DELIVERY,
    "mbox": _NO_DELIVERY,
    "capture": _NO_DELIVERY,
    "forward": _NO_DELIVERY,
    "webhook": _NO_DELIVERY,
    "aiosmtpd_handler": _NO_DELIVERY,
    "lmtp": "a honeypot speaks SMTP, not LMTP",
    "state_dir": "a honeypot keeps its state in its data directory (data_dir, --data-dir)",
    "auth_users": _OWN_AUTH,
    "users_file": _OWN_AUTH,
    "auth_capture": _OWN_AUTH,
    "local_domains": _EVERY_DOMAIN,
    "relay_networks": _EVERY_DOMAIN,
    "open_relay": _EVERY_DOMAIN,
    "submission_listen": _NO_SUBMISSION,
    "submissions_listen": _NO_SUBMISSION,
}


_NOTHING_ONWARD = "a honeypot never sends mail onward (nothing is routed, queued or relayed)"
#: Tables a honeypot's file may not have, with the reason.
HONEYPOT_REFUSED_TABLES: Mapping[str, str] = {
    "routes": _NOTHING_ONWARD,
    "queue": _NOTHING_ONWARD,
    "outbound": _NOTHING_ONWARD,
    "dkim_sign": _NOTHING_ONWARD,
    "arc_seal": _NOTHING_ONWARD,
}


def refuse_tables(sections: tuple[PolicySection, ...]) -> None:
    """Raise for a table (``[[routes]]``, ``[queue]``, ``[outbound]``) a honeypot cannot
    honour, naming it."""
    for section in sections:
        reason = HONEYPOT_REFUSED_TABLES.get(section.name)
        if reason is not None:
            raise ConfigError(f"{section.source}: not for honeypot mode: {reason}")


#: The serve flags ``mailgate honeypot`` parses only to refuse them with the reason (they
#: are not in its --help): the refused settings, and workers, which may only be 1.
REFUSED_FLAGS: tuple[str, ...] = (*HONEYPOT_REFUSED, "workers")


def refuse_server_settings(values: Mapping[str, Value]) -> None:
    """Raise for a [server] setting (from the file or a flag) a honeypot cannot honour."""
    for key, reason in HONEYPOT_REFUSED.items():
        value = values.get(key)
        if value is not None and value.raw is not False and value.raw != []:
            raise value.error(f"not for honeypot mode: {reason}")
    workers = values.get("workers")
    if workers is not None and converters.count(workers) > 1:
        raise workers.error("honeypot mode runs in one process; remove workers")


#: [honeypot] keys that are shorthands for a key of a policy table.
_POLICY_TWINS = {"block_networks": "lists", "connections_per_ip": "limits"}


def check_policy_overlap(
    honeypot: Mapping[str, Value], sections: tuple[PolicySection, ...]
) -> None:
    """A [honeypot] key and the same key in its policy table of the same file: which one
    was meant is unclear. (A flag simply wins over both.)"""
    for key, table in _POLICY_TWINS.items():
        value = honeypot.get(key)
        if value is None or value.base is None:  # not given, or given as a flag
            continue
        for section in sections:
            if section.name == table and key in section.values:
                raise value.error(f"[{table}] {key} is set too; keep one")
