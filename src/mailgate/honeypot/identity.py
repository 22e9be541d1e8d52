"""Generated site identities for honeypot personas (the GenAIPot idea).

Every deployment of a built-in persona looks the same: the same host name, banner and
timing. :func:`generate` asks a language model behind an OpenAI-compatible
chat-completions API (OpenAI, Ollama, llama.cpp's server, vLLM: one API, spoken with the
``openai`` package, the ``mailgate[genai]`` extra) to invent a plausible site within the
product's conventions, and turns its answer into a persona profile:

- the model is told the product's conventions (:data:`PRODUCTS`): the banner variants
  the product really shows, the version strings it really ships (Postfix and Exchange
  show none), host name style, its system users, and the bounds of everything;
- its answer is checked field by field (:func:`check_identity`: a valid DNS host name, a
  banner variant and version from the lists, no control characters, no braces, bounded
  lengths, delays within bounds), then built with :func:`~.personas.profile_from_mapping`,
  the checks every hand-written profile goes through, and the banner is rendered once;
- an answer that fails is sent back to the model with the reason (at most
  :data:`MAX_ATTEMPTS` requests in all, each bounded by ``timeout``); when none works, or
  the endpoint cannot be reached, the result is the base persona and a reason to warn
  with -- never an exception, never a profile that breaks the protocol.

The result is written as a profile file (:func:`profile_text`): ``base`` and the changed
keys only, so it reads like a hand-written one. ``mailgate honeypot --generate-identity``
keeps it in the data directory (:func:`persona_for_start`), so the identity is stable
across restarts.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import textwrap
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from mailgate.protocol.persona import format_date
from mailgate.settings import ConfigError

from .personas import (
    PERSONAS,
    PersonaProfile,
    ProfileError,
    load_profile,
    profile_from_mapping,
)
from .settings import HoneypotOptions

if TYPE_CHECKING:
    import openai

log = logging.getLogger("mailgate.honeypot")
T = TypeVar("T")

__all__ = [
    "IDENTITY_FILE",
    "MAX_ATTEMPTS",
    "PRODUCTS",
    "Conventions",
    "GenAIUnavailable",
    "Generation",
    "Identity",
    "IdentityError",
    "api_key_from_env",
    "check_identity",
    "generate",
    "parse_answer",
    "persona_for_start",
    "profile_text",
    "rendered_banner",
    "write_profile",
]

#: The generated identity in a honeypot's data directory.
IDENTITY_FILE: Final = "identity.toml"
#: Requests to the model at most (the first, and retries with the reason fed back).
MAX_ATTEMPTS: Final = 3
#: Bounds of a generated identity (tighter than a hand-written profile's: an invented
#: site should look ordinary, not slow).
MAX_GENERATED_BANNER_DELAY: Final = 1.0
MAX_GENERATED_REPLY_DELAY: Final = 0.25
MAX_HOSTNAME: Final = 100
MAX_DESCRIPTION: Final = 100
MAX_SITE_TEXT: Final = 80
MAX_LOCAL_USERS: Final = 30
#: Characters of the model's answer that are looked at (an answer is a few hundred).
MAX_ANSWER: Final = 64 * 1024
_EXTRA = "mailgate[genai]"


class GenAIUnavailable(RuntimeError):
    """The ``openai`` package is not installed."""

    def __init__(self) -> None:
        super().__init__(f"generating an identity needs the openai package: pip install '{_EXTRA}'")


class IdentityError(ValueError):
    """An answer that is not a usable identity; the message says why (it is fed back to
    the model)."""


# --- the products' conventions --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Conventions:
    """What an identity of one product may look like."""

    #: The built-in persona it starts from.
    base: str
    product: str
    #: Version strings the product really ships and shows; empty: it shows none.
    versions: tuple[str, ...]
    #: ``software`` for a version ("Exim {version}").
    software_format: str
    #: Banner templates as the product (or its packagers) write them.
    banners: tuple[str, ...]
    hostname_style: str
    #: Local users every installation has (the RFC's postmaster and the product's own).
    system_users: tuple[str, ...]
    #: The ``rejected`` reply up to the site's text.
    rejected_prefix: str
    notes: str = ""

    def software(self, version: str) -> str:
        return self.software_format.format(version=version)


#: Conventions per built-in persona.
PRODUCTS: Mapping[str, Conventions] = {
    "postfix": Conventions(
        base="postfix",
        product="Postfix",
        versions=(),
        software_format="Postfix",
        banners=(
            "{hostname} ESMTP {software} (Debian/GNU)",
            "{hostname} ESMTP {software} (Ubuntu)",
            "{hostname} ESMTP {software}",
        ),
        hostname_style="mail.DOMAIN, mx.DOMAIN, mx1.DOMAIN, smtp.DOMAIN or a machine name "
        "in lower case",
        system_users=("root", "postmaster", "postfix", "mailer-daemon"),
        rejected_prefix="554 5.7.1 <unknown[{client_ip}]>: Client host rejected: ",
        notes="Postfix shows no version by default (smtpd_banner is $myhostname ESMTP "
        "$mail_name, with the distribution in brackets on Debian and Ubuntu).",
    ),
    "exim": Conventions(
        base="exim",
        product="Exim",
        # Up to 4.96: the persona's queue ids are in the format before 4.97.
        versions=("4.92", "4.92.3", "4.93", "4.94", "4.94.2", "4.95", "4.96", "4.96.1", "4.96.2"),
        software_format="Exim {version}",
        banners=("{hostname} ESMTP {software} {date_padded}",),
        hostname_style="mail.DOMAIN, mx.DOMAIN, mx1.DOMAIN, smtp.DOMAIN or a machine name "
        "in lower case",
        system_users=("root", "postmaster", "mailer-daemon", "Debian-exim"),
        rejected_prefix="550 ",
        notes="Exim's banner shows its version and the date (smtp_banner = "
        "$smtp_active_hostname ESMTP Exim $version_number $tod_full).",
    ),
    "exchange": Conventions(
        base="exchange",
        product="Microsoft Exchange Server 2019",
        versions=(),
        software_format="Microsoft ESMTP MAIL Service",
        banners=("{hostname} {software} ready at {date}",),
        hostname_style="the server's name in upper case (EXCH01, EX2019-01, MAIL01, MBX02) "
        "followed by the organisation's domain",
        system_users=("postmaster", "administrator", "admin"),
        rejected_prefix="550 5.7.1 ",
        notes="Exchange's banner never shows a version.",
    ),
    "sendmail": Conventions(
        base="sendmail",
        product="Sendmail",
        # Sendmail's own version numbers ($v), as its banner and HELP show them; Debian 12
        # ships the 8.17.1.9 release (a four-part number), Debian 10/11 and Ubuntu 8.15.2.
        versions=(
            "8.14.4",
            "8.14.7",
            "8.15.2",
            "8.16.1",
            "8.17.1",
            "8.17.1.9",
            "8.17.2",
            "8.18.1",
        ),
        software_format="Sendmail {version}/{version}",
        banners=("{hostname} ESMTP {software}; {date}",),
        hostname_style="mail.DOMAIN, mx.DOMAIN, a machine name in lower case",
        system_users=("root", "postmaster", "mailer-daemon", "smmsp"),
        rejected_prefix="550 5.7.1 ",
        notes="Sendmail's banner shows the binary's and the configuration's version "
        "(8.15.2/8.15.2) and the date.",
    ),
    "generic": Conventions(
        base="generic",
        product="a generic ESMTP server",
        versions=(),
        software_format="ESMTP",
        banners=(
            "{hostname} ESMTP Service ready",
            "{hostname} ESMTP ready",
            "{hostname} ESMTP",
        ),
        hostname_style="mail.DOMAIN, mx.DOMAIN, smtp.DOMAIN",
        system_users=("root", "postmaster", "abuse"),
        rejected_prefix="554 5.7.1 ",
    ),
}

#: The version each built-in persona shows (texts that quote it change with the version).
_BASE_VERSIONS = {"exim": "4.96", "sendmail": "8.17.1.9"}

# --- the identity --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """A checked identity (see :func:`check_identity`)."""

    base: str
    hostname: str
    banner: str
    version: str
    description: str
    local_users: tuple[str, ...]
    rejected_text: str
    banner_delay: tuple[float, float]
    reply_delay: tuple[float, float]

    def profile_data(self) -> dict[str, Any]:
        """The profile file's keys (what :func:`profile_text` writes): the base and what
        the identity changes."""
        conv = PRODUCTS[self.base]
        base = PERSONAS[self.base]
        data: dict[str, Any] = {
            "base": self.base,
            "name": f"{self.base}-generated",
            "description": self.description,
            "hostname": self.hostname,
        }
        if conv.versions:
            data["software"] = conv.software(self.version)
        data["banner"] = self.banner
        old = _BASE_VERSIONS.get(self.base)
        help_reply = base.persona.reply("help")
        quoted = re.compile(rf"(?<![\d.]){re.escape(old)}(?![\d.]*\d)") if old else None
        if quoted and old != self.version and any(quoted.search(x) for x in help_reply.lines):
            # Texts quoting the version (sendmail's HELP) show the new one: the whole
            # number only, so 8.17.1 never turns 8.17.1.9 into 8.15.2.9.
            data["help"] = [quoted.sub(self.version, line) for line in help_reply.lines]
            data["help_code"] = help_reply.code
        # The base's users (the product's system users and aliases) stay; the site's
        # own come after them. A profile's list replaces the base's, so both are written.
        data["local_users"] = list(
            dict.fromkeys(u.lower() for u in (*base.local_users, *self.local_users))
        )
        data["timing"] = {
            "banner_delay": list(self.banner_delay),
            "reply_delay": list(self.reply_delay),
        }
        data["replies"] = {"rejected": conv.rejected_prefix + self.rejected_text}
        return data


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_TLD = re.compile(r"[A-Za-z]{2,24}")
_LOCAL_USER = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,30}[A-Za-z0-9])?")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _string(answer: Mapping[str, Any], key: str, limit: int, *, default: str | None = None) -> str:
    value = answer.get(key)
    if value is None:  # left out, or null
        value = default
    if value is None:
        raise IdentityError(f'"{key}" is missing')
    if not isinstance(value, str):
        raise IdentityError(f'"{key}" must be a string, got {type(value).__name__}')
    if _CONTROL.search(value):
        raise IdentityError(f'"{key}" holds a control character (CR, LF, ...): {value[:80]!r}')
    value = value.strip()
    if not _PRINTABLE.fullmatch(value):
        raise IdentityError(f'"{key}" must be printable ASCII: {value[:80]!r}')
    if len(value) > limit:
        raise IdentityError(f'"{key}" is longer than {limit} characters')
    return value


def _hostname_problem(name: str, domain: str | None) -> str:
    labels = name.removesuffix(".").split(".")
    if len(labels) < 2:
        return f"{name!r} is not a fully qualified host name (give host.domain.tld)"
    if not 2 <= len(labels) <= 6:
        return f"{name!r} has {len(labels)} labels; give 2 to 6"
    for label in labels:
        if not _LABEL.fullmatch(label):
            return f"{name!r} is not a valid DNS name (label {label!r})"
    if not _TLD.fullmatch(labels[-1]):
        return f"{name!r} does not end in a top-level domain of letters"
    if domain is not None:
        wanted = domain.lower().rstrip(".")
        if not name.lower().endswith("." + wanted):
            return f"{name!r} is not in the domain {wanted} (give a name like mail.{wanted})"
    return ""


def _delay(answer: Mapping[str, Any], key: str, bound: float) -> tuple[float, float]:
    value = answer.get(key)
    if value is None:
        value = [0, 0]
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise IdentityError(f'"{key}" must be [min, max] in seconds, got {value!r}'[:200])
    low, high = float(value[0]), float(value[1])
    if not 0.0 <= low <= high <= bound:
        raise IdentityError(f'"{key}" must have 0 <= min <= max <= {bound:g}, got {value!r}')
    return (round(low, 3), round(high, 3))


def check_identity(answer: Mapping[str, Any], base: str, *, domain: str | None = None) -> Identity:
    """The identity in the model's answer (a JSON object), checked against the product's
    conventions; IdentityError says what is wrong."""
    conv = PRODUCTS[base]
    hostname = _string(answer, "hostname", MAX_HOSTNAME).rstrip(".")
    problem = _hostname_problem(hostname, domain)
    if problem:
        raise IdentityError(f'"hostname": {problem}')
    if conv.versions:
        version = _string(answer, "version", 20)
        if version not in conv.versions:
            raise IdentityError(
                f'"version" {version!r} is not one {conv.product} ships; choose one of '
                + ", ".join(conv.versions)
            )
    else:
        version = _string(answer, "version", 20, default="")
        if version:
            raise IdentityError(f'"version" must be "": {conv.product} shows no version')
    software = conv.software(version)
    given = _string(answer, "banner", 200)
    # A model that filled in the host name or the product itself: take the template back.
    candidates = [given]
    if given.startswith(hostname):
        candidates.append("{hostname}" + given[len(hostname) :])
    candidates += [c.replace(software, "{software}", 1) for c in candidates if software in c]
    banner = next((c for c in candidates if c in conv.banners), given)
    if banner not in conv.banners:
        raise IdentityError(
            f'"banner" {banner!r} is not one of the banners {conv.product} shows; copy '
            "one of these exactly: " + "; ".join(conv.banners)
        )
    description = _string(
        answer, "description", MAX_DESCRIPTION, default=f"{conv.product} at {hostname}"
    )
    if "{" in description or "}" in description:
        raise IdentityError('"description" must not hold braces')
    users = answer.get("local_users", [])
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise IdentityError('"local_users" must be a list of strings')
    if len(users) > MAX_LOCAL_USERS:
        raise IdentityError(f'"local_users" has {len(users)} names; give at most {MAX_LOCAL_USERS}')
    local_users = list(conv.system_users)
    for user in users:
        if not _LOCAL_USER.fullmatch(user):
            raise IdentityError(
                f'"local_users": {user[:40]!r} is not a local user name (letters, digits, '
                "'.', '_', '-'; at most 32 characters)"
            )
        if user.lower() not in (u.lower() for u in local_users):
            local_users.append(user)
    rejected_text = _string(answer, "rejected_text", MAX_SITE_TEXT, default="Access denied")
    if not rejected_text:
        rejected_text = "Access denied"
    if "{" in rejected_text or "}" in rejected_text:
        raise IdentityError('"rejected_text" must not hold braces (no placeholders)')
    return Identity(
        base=base,
        hostname=hostname,
        banner=banner,
        version=version,
        description=description,
        local_users=tuple(local_users),
        rejected_text=rejected_text,
        banner_delay=_delay(answer, "banner_delay", MAX_GENERATED_BANNER_DELAY),
        reply_delay=_delay(answer, "reply_delay", MAX_GENERATED_REPLY_DELAY),
    )


def identity_profile(identity: Identity, source: str = "<generated identity>") -> PersonaProfile:
    """The persona profile of ``identity``, built and checked as a profile file is; its
    banner rendered once (IdentityError for anything that does not hold)."""
    try:
        profile = profile_from_mapping(identity.profile_data(), source=source)
    except ProfileError as exc:
        raise IdentityError(exc.detail if not exc.key else f"{exc.key}: {exc.detail}") from None
    line = rendered_banner(profile)
    if len(line) + 2 > 512 or not _PRINTABLE.fullmatch(line):
        raise IdentityError(f'"banner" renders as an unusable line: {line[:80]!r}')
    return profile


def rendered_banner(profile: PersonaProfile, client_ip: str = "203.0.113.200") -> str:
    """The 220 line as a client would see it now (without CRLF)."""
    moment = datetime.now(UTC)
    reply = profile.persona.banner_reply(
        {
            "hostname": profile.hostname,
            "software": profile.software,
            "protocol": "ESMTP",
            "date": format_date(moment),
            "date_padded": format_date(moment, padded=True),
            "client_ip": client_ip,
        }
    )
    return f"{reply.code} {reply.lines[0]}"  # a banner is one line (no CR/LF in it)


def parse_answer(text: str | None) -> dict[str, Any]:
    """The JSON object in the model's answer: the whole answer, or the first object in it
    (models wrap it in prose or code fences), or the one object inside a wrapper."""
    if not text or not text.strip():
        raise IdentityError("the answer is empty")
    text = text[:MAX_ANSWER]
    start = text.find("{")
    if start < 0:
        raise IdentityError("the answer holds no JSON object")
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as exc:
        raise IdentityError(f"the answer is not valid JSON: {exc.msg} (at {exc.pos})") from None
    if not isinstance(value, dict):
        raise IdentityError("the answer is not a JSON object")
    if "hostname" not in value and len(value) == 1:
        (inner,) = value.values()
        if isinstance(inner, dict):
            value = inner  # {"identity": {...}}
    return value


# --- the profile file ------------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a valid TOML basic string for ASCII text
    if isinstance(value, list):
        items = [_toml(v) for v in value]
        if sum(len(item) + 2 for item in items) <= 60:
            return "[" + ", ".join(items) + "]"
        return "[\n" + "".join(f"    {item},\n" for item in items) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _comment(text: str) -> list[str]:
    """Text as TOML comment lines: printable ASCII, wrapped."""
    cleaned = re.sub(r"[^\x20-\x7e]", "?", text)[:1000]
    return [f"# {line}" for line in textwrap.wrap(cleaned, 86) or [""]]


def profile_text(data: Mapping[str, Any], header: Sequence[str]) -> str:
    """A profile file with ``header`` as comments, the top-level keys of ``data``, then
    its ``[timing]`` and ``[replies]`` tables."""
    lines = [comment for line in header for comment in _comment(line)]
    lines.append("")
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    for key, value in data.items():
        if key not in tables:
            lines.append(f"{key} = {_toml(value)}")
    for name, table in tables.items():
        lines += ["", f"[{name}]"]
        lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def write_profile(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="ascii")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# --- asking the model ------------------------------------------------------------------------


def _prompt(conv: Conventions, domain: str | None) -> list[dict[str, str]]:
    base = PERSONAS[conv.base]
    if conv.versions:
        version_rule = (
            f'"version": one of {json.dumps(list(conv.versions))}, the versions '
            f"{conv.product} really ships; {{software}} becomes "
            f'"{conv.software_format}" with it.'
        )
    else:
        version_rule = f'"version": "" ({conv.product} shows no version).'
    domain_rule = (
        f" It must be in the domain {domain} (a name ending in .{domain})."
        if domain
        else " Invent an ordinary organisation's domain (a company, school, clinic or "
        "municipality); never example.com or another reserved name."
    )
    rules = "\n".join(
        [
            f"You invent the identity of one mail server site running {conv.product} "
            f"(configured like: {base.description}). {conv.notes}",
            "Answer with one JSON object and nothing else, with exactly these keys:",
            f'- "hostname": the server\'s fully qualified host name, 2 to 6 labels of '
            f"letters, digits and hyphens, at most {MAX_HOSTNAME} characters; style: "
            f"{conv.hostname_style}.{domain_rule}",
            f'- "banner": one of these templates, copied exactly, placeholders in braces '
            f"kept as they are (the server fills them in): {json.dumps(list(conv.banners))}.",
            f"- {version_rule}",
            f'- "description": one line about the site, at most {MAX_DESCRIPTION} '
            "characters, for the operator's listings.",
            f'- "local_users": 4 to 20 local mailbox names this site plausibly has (staff '
            "logins like jsmith or m.keller, role accounts like info, sales, helpdesk), "
            "lower-case letters, digits, '.', '_', '-', at most 32 characters each; "
            f"{', '.join(conv.system_users)} exist anyway.",
            f'- "rejected_text": the site\'s words when it refuses a blocked client, at most '
            f"{MAX_SITE_TEXT} printable ASCII characters, no braces (e.g. Access denied).",
            f'- "banner_delay": [min, max] seconds before the greeting, 0 <= min <= max <= '
            f"{MAX_GENERATED_BANNER_DELAY:g} (what its DNS lookups and checks take).",
            f'- "reply_delay": [min, max] seconds before each answer, 0 <= min <= max <= '
            f"{MAX_GENERATED_REPLY_DELAY:g}.",
            "Only printable ASCII; no line breaks inside values.",
        ]
    )
    return [
        {
            "role": "system",
            "content": "You configure mail servers for a research honeypot. You answer "
            "with one JSON object only: no prose, no code fences.",
        },
        {"role": "user", "content": rules},
    ]


def _client(url: str, api_key: str | None, timeout: float) -> openai.OpenAI:
    try:
        import openai
    except ImportError:
        raise GenAIUnavailable() from None
    base_url = url.rstrip("/").removesuffix("/chat/completions")
    return openai.OpenAI(
        base_url=base_url,
        # A local server (Ollama, llama.cpp) wants none; the library wants a string.
        api_key=api_key or "no-key",
        timeout=timeout,
        max_retries=0,  # the retries are ours: bounded, with the reason fed back
    )


def _one_line(text: object, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def _error_text(exc: openai.APIStatusError) -> str:
    """The server's own error message (OpenAI's {"error": {"message": ...}})."""
    body = exc.body
    if isinstance(body, Mapping) and isinstance(body.get("message"), str):
        return _one_line(body["message"])
    return _one_line(exc.message)


@dataclass(frozen=True, slots=True)
class Generation:
    """What :func:`generate` made: ``generated`` is False when it fell back to the base
    persona (``problems`` says why; ``warning`` is the line to log)."""

    base: str
    profile: PersonaProfile
    text: str
    generated: bool
    attempts: int
    identity: Identity | None = None
    problems: tuple[str, ...] = field(default=())

    @property
    def warning(self) -> str:
        return _warning(self.base, self.attempts, self.problems)


def _warning(base: str, attempts: int, problems: Sequence[str]) -> str:
    last = problems[-1] if problems else "no answer"
    plural = "s" if attempts != 1 else ""
    return (
        f"no usable identity from the model after {attempts} attempt{plural} ({last}); "
        f"using the {base} persona as it is"
    )


def api_key_from_env(variable: str | None) -> str | None:
    """The API key in the environment variable ``variable`` (None: no key). ConfigError
    when the variable is not set (the key itself never appears in a file or a flag)."""
    if variable is None:
        return None
    key = os.environ.get(variable, "").strip()
    if not key:
        raise ConfigError(f"the environment variable {variable} (api key) is not set")
    return key


def generate(
    base: str,
    *,
    url: str,
    model: str,
    api_key: str | None = None,
    timeout: float = 60.0,
    attempts: int = MAX_ATTEMPTS,
    domain: str | None = None,
    header: Sequence[str] = (),
    clock: Callable[[], float] = time.monotonic,
) -> Generation:
    """Ask ``model`` at ``url`` for an identity of the built-in persona ``base``.

    At most ``attempts`` requests, each bounded by ``timeout`` seconds of wall-clock time
    (and all by ``attempts * (timeout + 0.5)`` and half a second). Never raises for what the endpoint or the model does: the
    result is then the base persona, ``generated`` False. Raises GenAIUnavailable when
    the openai package is missing, KeyError for an unknown ``base``."""
    conv = PRODUCTS[base]
    client = _client(url, api_key, timeout)
    try:
        return _generate(client, conv, url, model, timeout, attempts, domain, header, clock)
    finally:
        # Also ends a request still running in its thread after its time was up.
        client.close()


def _generate(
    client: openai.OpenAI,
    conv: Conventions,
    url: str,
    model: str,
    timeout: float,
    attempts: int,
    domain: str | None,
    header: Sequence[str],
    clock: Callable[[], float],
) -> Generation:
    import openai

    base = conv.base
    messages: list[dict[str, str]] = _prompt(conv, domain)
    problems: list[str] = []
    json_mode = True
    # Every request gets its whole timeout and the slack of _within.
    deadline = clock() + (timeout + _SLACK) * attempts + _SLACK
    made = 0
    while made < attempts:
        remaining = deadline - clock()
        if remaining <= 0:
            problems.append("out of time")
            break
        made += 1
        try:
            wait = min(timeout, remaining)
            request = functools.partial(_ask, client, model, messages, json_mode, wait)
            content = _within(wait, request)
        except openai.BadRequestError as exc:
            if json_mode:
                # Some servers do not take response_format: ask again without it (once,
                # and not counted: nothing was answered).
                json_mode = False
                made -= 1
                problems.append(f"HTTP 400 with response_format: {_error_text(exc)}")
                continue
            problems.append(f"HTTP 400: {_error_text(exc)}")
            break
        except (
            openai.AuthenticationError,
            openai.PermissionDeniedError,
            openai.NotFoundError,
        ) as exc:
            # Asking again cannot help.
            problems.append(f"HTTP {exc.status_code}: {_error_text(exc)}")
            break
        except (openai.APITimeoutError, TimeoutError):
            problems.append(f"no answer within {wait:.3g} s")
            continue
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            problems.append(f"cannot reach {url}: {_one_line(cause)}")
            continue
        except openai.APIStatusError as exc:
            problems.append(f"HTTP {exc.status_code}: {_error_text(exc)}")
            continue
        except Exception as exc:  # an answer the library could not read: the model's fault
            problems.append(f"unusable answer ({type(exc).__name__}: {_one_line(exc)})")
            continue
        try:
            identity = check_identity(parse_answer(content), base, domain=domain)
            profile = identity_profile(identity)
        except IdentityError as exc:
            reason = _one_line(exc, 400)
            problems.append(f"attempt {made}: {reason}")
            messages = [
                *messages,
                {"role": "assistant", "content": (content or "")[:4000]},
                {
                    "role": "user",
                    "content": f"That answer was refused: {reason}. Answer again with the "
                    "complete JSON object, following every rule above.",
                },
            ]
            continue
        text = profile_text(identity.profile_data(), header)
        return Generation(base, profile, text, True, made, identity, tuple(problems))
    text = profile_text(
        {"base": base, "name": base},
        [*header, f"Generation failed: {_warning(base, made, problems)}."],
    )
    return Generation(base, PERSONAS[base], text, False, made, None, tuple(problems))


#: Seconds a request may run past its timeout before it is given up (the HTTP client's
#: own timeout fires first, unless the server trickles its answer).
_SLACK: Final = 0.5


def _within(seconds: float, call: Callable[[], T]) -> T:
    """``call()``, or TimeoutError after ``seconds``. The HTTP client's timeout bounds
    each step (connecting, each read); this bounds the whole request, also against a
    server that trickles its answer. A call still running is left to its daemon thread,
    which closing the client ends."""
    outcome: list[T] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the caller
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="genai-request", daemon=True).start()
    if not done.wait(seconds + _SLACK):  # the client's own timeout usually ends it first
        raise TimeoutError(f"no answer within {seconds:g} s")
    if failure:
        raise failure[0]
    return outcome[0]


def _ask(
    client: openai.OpenAI,
    model: str,
    messages: list[dict[str, str]],
    json_mode: bool,
    timeout: float,
) -> str | None:
    extra: dict[str, Any] = {"response_format": {"type": "json_object"}} if json_mode else {}
    completion = client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        timeout=timeout,
        **extra,
    )
    choices = completion.choices or []
    if not choices or choices[0].message is None:
        raise IdentityError("the answer has no message")
    return choices[0].message.content


# --- honeypot start ------------------------------------------------------------------------


def header_lines(base: str, model: str, url: str) -> list[str]:
    """The comment at the top of a generated profile."""
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [
        f"mailgate persona profile: a site identity for the {base} persona, generated",
        f"by the model {model} at {url} on {when}.",
        "An invented site within the product's conventions, checked like any profile",
        "file; edit it as you like (docs/honeypot.md, Generated identities).",
    ]


def _stored_base(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc} (delete it to generate again)") from None
    base = data.get("base")
    return base if isinstance(base, str) else None


def persona_for_start(honeypot: HoneypotOptions) -> PersonaProfile:
    """The persona of a honeypot started with ``generate_identity``: the identity kept in
    the data directory, else a new one (kept there for later starts), else the base
    persona with a warning. ConfigError for settings that cannot work (no URL or model,
    the API key's variable unset, the openai package missing, an unreadable identity)."""
    if honeypot.llm_url is None or honeypot.llm_model is None:
        raise ConfigError(
            "generate_identity needs llm_url (--llm-url URL) and llm_model (--model NAME)"
        )
    if honeypot.profile is not None:
        raise ConfigError(
            "give either profile (--profile) or generate_identity (--generate-identity)"
        )
    path = honeypot.data_dir / IDENTITY_FILE
    if path.exists():
        stored = _stored_base(path)
        if stored == honeypot.persona:
            try:
                return load_profile(path)
            except ProfileError as exc:
                raise ConfigError(
                    f"generated identity {exc} (fix it, or delete it to generate again)"
                ) from None
        log.warning(
            "honeypot: %s is an identity for persona %s, not %s: generating a new one",
            path,
            stored,
            honeypot.persona,
        )
    api_key = api_key_from_env(honeypot.llm_api_key_env)
    try:
        result = generate(
            honeypot.persona,
            url=honeypot.llm_url,
            model=honeypot.llm_model,
            api_key=api_key,
            timeout=honeypot.llm_timeout,
            domain=honeypot.identity_domain,
            header=header_lines(honeypot.persona, honeypot.llm_model, honeypot.llm_url),
        )
    except GenAIUnavailable as exc:
        raise ConfigError(str(exc)) from None
    if not result.generated:
        log.warning("honeypot: %s; the next start tries again", result.warning)
        return result.profile
    try:
        honeypot.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_profile(path, result.text)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    identity = result.identity
    assert identity is not None
    log.info(
        "honeypot: generated identity %s (%s) with %s, kept in %s",
        identity.hostname,
        identity.banner,
        honeypot.llm_model,
        path,
    )
    return result.profile
