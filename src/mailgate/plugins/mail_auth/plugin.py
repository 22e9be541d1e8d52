"""The mail-auth policy plugin: SPF at MAIL, DKIM and DMARC when the message has
arrived, the replies that refuse, and one ``Authentication-Results:`` header per message.
The checks themselves are in the sibling modules (spf, dkim, dmarc); they block, so the
plugin runs them in a small thread pool of its own, with its resolver's blocking lookup.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import random
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mailgate.dns import Resolver
from mailgate.hooks import Address, Envelope, Message, Reject, Session
from mailgate.plugins.policy import (
    LazyResolver,
    PolicyEnv,
    SectionReader,
    allowlisted,
    decide,
    in_networks,
)
from mailgate.server.options import Network, PolicySection

from .dkim import (
    MAX_SIGNATURES,
    ARCResult,
    DKIMResult,
    header_fields,
    signature_ids,
    verify_arc,
    verify_dkim,
)
from .dmarc import DMARCResult, evaluate_dmarc, from_domains, worst
from .header import authserv_of, property_value
from .spf import SPFResult, check_spf

log = logging.getLogger("mailgate.policy.mail_auth")

POLICY = "mail-auth"
#: session.notes key: ``{"spf": SPFResult}`` from MAIL on, plus ``"results":
#: AuthResults`` once the message has been checked (until the next transaction).
NOTES_KEY = "mail-auth"
#: The header a DMARC quarantine (or ``dmarc_reject = "quarantine-header"``) adds.
QUARANTINE_HEADER = "X-Mailgate-Quarantine"
#: Distinct From domains evaluated per message for DMARC.
MAX_FROM_DOMAINS = 5
#: Longest header section read from a message above ``max_message_size``.
MAX_HEADER_BYTES = 256 * 1024
DEFAULT_MAX_MESSAGE_SIZE = 10 * 1024 * 1024

T = TypeVar("T")

SPF_FAIL_ACTIONS = ("annotate", "reject")
DMARC_REJECT_ACTIONS = ("reject", "quarantine-header", "annotate")
DMARC_QUARANTINE_ACTIONS = ("header", "annotate")


@dataclass(slots=True)
class AuthResults:
    """Everything checked for one message, and the header value it gives."""

    spf: SPFResult | None = None
    dkim: list[DKIMResult] = field(default_factory=list)
    dkim_checked: bool = False
    #: DKIM signatures were there but not verified (message above max_message_size).
    dkim_skipped: bool = False
    dmarc: DMARCResult | None = None
    #: The ARC chain the message arrived with, when it has one (checked with DKIM).
    arc: ARCResult | None = None
    #: Authentication-Results fields already in the message that claim our authserv-id
    #: (forged, or from a previous pass); removed before ours is added (RFC 8601 5).
    forged: int = 0

    def header_value(self, authserv_id: str, dmarc_disposition: str | None = None) -> str:
        parts = []
        if self.spf is not None:
            parts.append(self.spf.resinfo())
        if self.dkim_checked:
            parts.extend([r.resinfo() for r in self.dkim] or ["dkim=none"])
        if self.arc is not None:
            parts.append(self.arc.resinfo())
        if self.dmarc is not None:
            parts.append(self.dmarc.resinfo(dmarc_disposition))
        return "; ".join([property_value(authserv_id), *(parts or ["none"])])

    def summary(self) -> str:
        items = []
        if self.spf is not None:
            items.append(f"spf={self.spf.result}")
        if self.dkim_checked:
            dkims = ",".join(r.result for r in self.dkim) or "none"
            items.append(f"dkim={dkims}")
        if self.arc is not None:
            items.append(f"arc={self.arc.result}")
        if self.dmarc is not None:
            items.append(f"dmarc={self.dmarc.result}")
        return " ".join(items) or "nothing checked"


# --- reading the message ----------------------------------------------------------------------


def read_for_check(message: Message, limit: int) -> tuple[bytes, bool]:
    """The message bytes, or only its header section when it is above ``limit``; the
    flag says whether the whole message was read (blocking)."""
    with message.open() as f:
        if message.size <= limit:
            data = f.read(limit + MAX_HEADER_BYTES + 1)
            if len(data) <= limit + MAX_HEADER_BYTES:
                return data, True
            f.seek(0)
        head = bytearray()
        while len(head) < MAX_HEADER_BYTES:
            line = f.readline(MAX_HEADER_BYTES - len(head))
            if not line:
                break
            head += line
            if line in (b"\r\n", b"\n"):
                break
        return bytes(head), False


# --- the plugin ---------------------------------------------------------------------------------


class MailAuth(LazyResolver):
    """SPF at MAIL, DKIM and DMARC at the end of DATA, one Authentication-Results header.

    ``spf_fail``: "annotate" or "reject" (550 5.7.23 at MAIL for an SPF ``fail``).
    ``dmarc_reject``: what a failing message from a ``p=reject`` domain gets: "reject"
    (550 5.7.1 after DATA), "quarantine-header" (delivered with X-Mailgate-Quarantine) or
    "annotate" (only the Authentication-Results). ``dmarc_quarantine``: "header" or
    "annotate" for ``p=quarantine``. Authenticated clients and ``relay_networks`` are not
    checked at all; allow-listed clients are checked but never refused.
    """

    name = "mail-auth"

    def __init__(
        self,
        *,
        spf: bool = True,
        dkim: bool = True,
        dmarc: bool = True,
        spf_fail: str = "annotate",
        dmarc_reject: str = "reject",
        dmarc_quarantine: str = "header",
        authserv_id: str | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        relay_networks: Iterable[Network] = (),
        resolver: Resolver | None = None,
        max_threads: int = 8,
    ) -> None:
        for key, value, allowed in (
            ("spf_fail", spf_fail, SPF_FAIL_ACTIONS),
            ("dmarc_reject", dmarc_reject, DMARC_REJECT_ACTIONS),
            ("dmarc_quarantine", dmarc_quarantine, DMARC_QUARANTINE_ACTIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, not {value!r}")
        if max_message_size < 0 or max_threads < 1:
            raise ValueError("max_message_size must be >= 0 and max_threads >= 1")
        self.spf = spf
        self.dkim = dkim
        self.dmarc = dmarc
        self.spf_fail = spf_fail
        self.dmarc_reject = dmarc_reject
        self.dmarc_quarantine = dmarc_quarantine
        self.authserv_id = authserv_id or socket.gethostname()
        self.max_message_size = max_message_size
        self.relay_networks = tuple(relay_networks)
        self._resolver = resolver
        self._env: PolicyEnv | None = None
        self.max_threads = max_threads
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        #: pct= sampling; replaceable for tests.
        self.sample: Callable[[], float] = random.random

    @classmethod
    def from_section(cls, section: PolicySection, env: PolicyEnv) -> MailAuth:
        reader = SectionReader(section)
        plugin = cls(
            spf=reader.boolean("spf", True),
            dkim=reader.boolean("dkim", True),
            dmarc=reader.boolean("dmarc", True),
            spf_fail=reader.choice("spf_fail", SPF_FAIL_ACTIONS, "annotate"),
            dmarc_reject=reader.choice("dmarc_reject", DMARC_REJECT_ACTIONS, "reject"),
            dmarc_quarantine=reader.choice("dmarc_quarantine", DMARC_QUARANTINE_ACTIONS, "header"),
            authserv_id=(reader.string("authserv_id", "") or "").strip() or env.options.hostname,
            max_message_size=reader.size("max_message_size", DEFAULT_MAX_MESSAGE_SIZE),
            relay_networks=env.options.relay_networks,
        )
        reader.done()
        if any(c.isspace() or c in ";()" for c in plugin.authserv_id):
            raise reader.error("authserv_id", f"{plugin.authserv_id!r} is not a host name")
        plugin._env = env  # the shared resolver, made on first use
        return plugin

    # --- stages ---------------------------------------------------------------------------

    async def on_mail(self, session: Session, envelope: Envelope, address: Address) -> None:
        session.notes.pop(NOTES_KEY, None)  # a new transaction
        if not self.spf:
            return None
        skip = self._skip_reason(session)
        if skip is not None:
            decide(session, POLICY, "skip", skip, level=logging.DEBUG)
            return None
        result = await self._run(self._check_spf, session, str(address))
        session.notes[NOTES_KEY] = {"spf": result}
        why = f"spf={result.result} for {result.identity} {result.domain or '-'}"
        if result.result == "fail" and self.spf_fail == "reject":
            listed = allowlisted(session)
            if listed is None:
                decide(session, POLICY, "reject", why, spf=result.result, domain=result.domain)
                raise Reject(
                    550,
                    f"SPF validation failed: {session.peer_host} may not send mail for "
                    f"{_shown(result.domain)}",
                    enhanced="5.7.23",
                )
            why += f", not refused: allow-listed ({listed})"
        verdict = {"pass": "accept", "temperror": "error"}.get(result.result, "annotate")
        decide(session, POLICY, verdict, why, spf=result.result, domain=result.domain)
        return None

    async def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
        state = session.notes.get(NOTES_KEY) or {}
        if not (self.spf or self.dkim or self.dmarc):
            return None
        skip = self._skip_reason(session)
        if skip is not None:
            decide(session, POLICY, "skip", skip, level=logging.DEBUG)
            return None
        if message.path is None:
            decide(session, POLICY, "skip", "no message file (sink mode)")
            return None
        spf_result = state.get("spf") if self.spf else None
        try:
            if self.spf and spf_result is None:  # added after MAIL, or MAIL not seen
                spf_result = await self._run(self._check_spf, session, envelope.sender)
            results = await self._run(self._check_message, message, spf_result)
        except Exception as exc:  # fail open: a broken check must not refuse mail
            log.exception("session %s: mail authentication failed", session.id)
            decide(session, POLICY, "error", f"check failed: {exc!r}", level=logging.WARNING)
            return None
        session.notes[NOTES_KEY] = {"spf": spf_result, "results": results}
        action, why, note = self._dmarc_action(session, results)
        if note and results.dmarc is not None:
            results.dmarc = dataclasses.replace(results.dmarc, comment=note)
        fields: dict[str, Any] = {
            "spf": results.spf.result if results.spf else None,
            "dkim": ",".join(r.result for r in results.dkim) if results.dkim_checked else None,
            "dmarc": results.dmarc.result if results.dmarc else None,
            "header_from": results.dmarc.from_domain if results.dmarc else None,
        }
        if results.forged:
            fields["forged_results"] = results.forged
        summary = results.summary() + (f"; {why}" if why else "")
        dmarc = results.dmarc
        if action == "reject":
            assert dmarc is not None
            decide(session, POLICY, "reject", summary, **fields)
            raise Reject(
                550,
                f"Email from {_shown(dmarc.from_domain)} rejected per DMARC policy",
                enhanced="5.7.1",
            )
        disposition = {"quarantine": "quarantine", "annotate": "none"}.get(action)
        if dmarc is None or dmarc.policy is None:
            disposition = None
        if results.forged:
            # RFC 8601 5: fields claiming our authserv-id that we did not write are
            # removed, so that nothing downstream trusts them.
            authserv = self.authserv_id.lower()
            await message.remove_headers(
                lambda name, value: (
                    name.lower() == "authentication-results"
                    and authserv_of(value.encode("utf-8", "surrogateescape")) == authserv
                )
            )
        if action == "quarantine":
            await message.prepend_header(QUARANTINE_HEADER, "dmarc")
        await message.prepend_header(
            "Authentication-Results", results.header_value(self.authserv_id, disposition)
        )
        if action == "quarantine" or (dmarc is not None and dmarc.result == "fail"):
            verdict = "annotate"
        elif any(
            r is not None and r.result == "temperror" for r in (results.spf, dmarc, *results.dkim)
        ):
            verdict = "error"
        else:
            verdict = "accept"
        decide(session, POLICY, verdict, summary, **fields)
        return None

    async def on_reset(self, session: Session, envelope: Envelope) -> None:
        session.notes.pop(NOTES_KEY, None)

    async def aclose(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    # --- decisions ------------------------------------------------------------------------------

    def _skip_reason(self, session: Session) -> str | None:
        """Mail from our own users and machines is not checked: SPF would judge their
        address, not the sender domain's servers. (Allow-listed clients are checked.)"""
        if session.user is not None:
            return f"authenticated as {session.user}"
        if in_networks(session.peer_host, self.relay_networks):
            return "in relay_networks"
        return None

    def _dmarc_action(self, session: Session, results: AuthResults) -> tuple[str, str, str]:
        """("reject" | "quarantine" | "annotate", why for the log, a note for the header
        when local policy overrides the domain's) for a message's DMARC result."""
        dmarc = results.dmarc
        if dmarc is None or dmarc.result != "fail":
            return "annotate", "", ""
        applied = dmarc.applied or "none"
        if applied == "reject":
            action = {"reject": "reject", "quarantine-header": "quarantine"}.get(
                self.dmarc_reject, "annotate"
            )
        elif applied == "quarantine":
            action = "quarantine" if self.dmarc_quarantine == "header" else "annotate"
        else:
            action = "annotate"
        why = f"p={dmarc.policy}"
        note = ""
        if applied != dmarc.policy:
            why += f" applied={applied}"
            note = "local policy: pct sampling"
        if action != "annotate" and results.dkim_skipped:
            why += ", not enforced: DKIM not verified (message too large)"
            return "annotate", why, "local policy: too large to verify"
        if action == "reject":
            listed = allowlisted(session)
            if listed is not None:
                return (
                    "annotate",
                    why + f", not refused: allow-listed ({listed})",
                    "local policy: allow-listed",
                )
        return action, why, note

    # --- blocking work (worker threads) ---------------------------------------------------------

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.max_threads, thread_name_prefix="mailgate-mail-auth"
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(func, *args))

    def _check_spf(self, session: Session, sender: str) -> SPFResult:
        return check_spf(
            self.resolver.sync_lookup,
            session.peer_host,
            sender,
            session.helo or "",
            receiver=self.authserv_id,
        )

    def _check_message(self, message: Message, spf_result: SPFResult | None) -> AuthResults:
        data, complete = read_for_check(message, self.max_message_size)
        return self.check_message(data, spf_result, complete=complete)

    def check_message(
        self, data: bytes, spf_result: SPFResult | None, *, complete: bool = True
    ) -> AuthResults:
        """DKIM and DMARC for message bytes (blocking; ``complete=False``: only the header
        section is there, so DKIM signatures are reported as not verified)."""
        lookup = self.resolver.sync_lookup
        results = AuthResults(spf=spf_result)
        headers = header_fields(data)
        authserv = self.authserv_id.lower()
        results.forged = sum(
            1
            for n, v in headers
            if n.strip().lower() == b"authentication-results" and authserv_of(v) == authserv
        )
        if self.dkim:
            results.dkim_checked = True
            if complete:
                results.dkim = verify_dkim(lookup, data)
            else:
                signatures = [v for n, v in headers if n.strip().lower() == b"dkim-signature"]
                results.dkim = [
                    DKIMResult("policy", *signature_ids(v), comment="message too large to verify")
                    for v in signatures[:MAX_SIGNATURES]
                ]
                results.dkim_skipped = bool(signatures)
            if complete and any(n.strip().lower() == b"arc-seal" for n, _ in headers):
                results.arc = verify_arc(lookup, data)
        if self.dmarc:
            domains = from_domains(headers)
            if isinstance(domains, str):
                results.dmarc = DMARCResult("permerror", comment=domains)
            else:
                results.dmarc = worst(
                    [
                        evaluate_dmarc(lookup, domain, spf_result, results.dkim, self.sample)
                        for domain in domains[:MAX_FROM_DOMAINS]
                    ]
                )
        return results


def _shown(domain: str) -> str:
    """A domain for a reply line (ASCII only)."""
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return "the sender's domain"


def plugins_from_options(env: PolicyEnv) -> list[Any]:
    """[MailAuth] when the configuration has a ``[mail_auth]`` table, else []."""
    section = env.section("mail_auth")
    if section is None:
        return []
    plugin = MailAuth.from_section(section, env)
    if not (plugin.spf or plugin.dkim or plugin.dmarc):
        return []
    return [plugin]


__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MAX_FROM_DOMAINS",
    "MAX_HEADER_BYTES",
    "NOTES_KEY",
    "POLICY",
    "QUARANTINE_HEADER",
    "AuthResults",
    "MailAuth",
    "plugins_from_options",
    "read_for_check",
]
