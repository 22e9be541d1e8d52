"""SPF, DKIM and DMARC verification (RFC 7208, 6376, 7489) with one
``Authentication-Results:`` header (RFC 8601) per message.

* SPF runs at MAIL FROM (the HELO identity when the sender is ``<>``, RFC 7208 2.4), so
  ``spf_fail = "reject"`` can refuse there with ``550 5.7.23`` (RFC 7372).
* DKIM and DMARC run when the message has arrived: every DKIM signature (up to
  :data:`MAX_SIGNATURES`) is verified, then DMARC is evaluated for the From domain with the
  SPF and DKIM results (relaxed or strict alignment, organizational domains from the
  public suffix list that authheaders ships; no network access for it).
* One ``Authentication-Results:`` header is prepended. A DMARC ``p=reject`` failure is
  refused after DATA (``550 5.7.1``), ``p=quarantine`` is delivered with an
  ``X-Mailgate-Quarantine: dmarc`` header; both are configurable.
* A temporary DNS error never refuses anything.

The libraries (pyspf, dkimpy) resolve names with blocking calls. Every check runs in a
worker thread of this plugin's own small pool (so slow DNS never holds up the event loop
nor the server's file I/O), and every lookup goes through the server's resolver
(``Resolver.sync_lookup``, i.e. the configured ``dns_nameservers``), never through the
libraries' own use of /etc/resolv.conf:

* dkimpy takes a ``dnsfunc`` per verification;
* pyspf looks names up through its module-level ``spf.DNSLookup``. It is replaced once by
  a dispatcher that uses the lookup function of the check running in the current thread
  (a thread-local), and falls back to pyspf's own lookup for anyone else in the process;
* DMARC policy discovery is done here (authheaders' DMARC code treats every unknown
  top-level domain as one organizational domain and lets DNS errors escape).
"""

from __future__ import annotations

import asyncio
import binascii
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import functools
import importlib.resources
import ipaddress
import logging
import random
import re
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import dkim  # type: ignore[import-untyped]
import spf  # type: ignore[import-untyped]

from mailgate.dns import DNSTempError, Resolver
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

log = logging.getLogger("mailgate.policy.mail_auth")

POLICY = "mail-auth"
#: session.notes key: ``{"spf": SPFResult}`` from MAIL on, plus ``"results":
#: AuthResults`` once the message has been checked (until the next transaction).
NOTES_KEY = "mail-auth"
#: The header a DMARC quarantine (or ``dmarc_reject = "quarantine-header"``) adds.
QUARANTINE_HEADER = "X-Mailgate-Quarantine"
#: DKIM signatures verified per message; more are ignored (each costs a DNS lookup).
MAX_SIGNATURES = 5
#: Distinct From domains evaluated per message for DMARC.
MAX_FROM_DOMAINS = 5
#: Longest header section read from a message above ``max_message_size``.
MAX_HEADER_BYTES = 256 * 1024
#: RFC 7208 4.6.4: at least 20 seconds for a whole SPF evaluation.
SPF_TIME_LIMIT = 20.0
DEFAULT_MAX_MESSAGE_SIZE = 10 * 1024 * 1024

#: A blocking DNS lookup: (name, rdtype) -> answers as text; raises DNSTempError.
Lookup = Callable[[str, str], list[str]]
T = TypeVar("T")

SPF_FAIL_ACTIONS = ("annotate", "reject")
DMARC_REJECT_ACTIONS = ("reject", "quarantine-header", "annotate")
DMARC_QUARANTINE_ACTIONS = ("header", "annotate")


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SPFResult:
    """One SPF evaluation: ``result`` is pass, fail, softfail, neutral, none, temperror or
    permerror; ``identity`` "mailfrom" or "helo"; ``domain`` the domain checked."""

    result: str
    identity: str
    domain: str
    comment: str = ""

    def resinfo(self) -> str:
        prop = "smtp.mailfrom" if self.identity == "mailfrom" else "smtp.helo"
        return _resinfo("spf", self.result, self.comment, [(prop, self.domain)])


@dataclass(frozen=True, slots=True)
class DKIMResult:
    """One DKIM signature: ``result`` is pass, fail, neutral, policy, temperror or
    permerror (RFC 8601 2.7.1); ``domain``/``selector`` from d= and s=; ``b`` the first
    characters of b= (RFC 6008, to tell signatures apart)."""

    result: str
    domain: str = ""
    selector: str = ""
    b: str = ""
    comment: str = ""

    def resinfo(self) -> str:
        props = [("header.d", self.domain), ("header.s", self.selector), ("header.b", self.b)]
        return _resinfo("dkim", self.result, self.comment, props)


@dataclass(frozen=True, slots=True)
class DMARCResult:
    """The DMARC evaluation of the From domain: ``result`` is pass, fail, none,
    temperror or permerror; ``policy`` the published policy that applies (p=, or sp= for
    a subdomain) and ``applied`` what remains after pct= sampling (both None when there
    is no record)."""

    result: str
    from_domain: str = ""
    policy: str | None = None
    applied: str | None = None
    comment: str = ""

    def resinfo(self, disposition: str | None = None) -> str:
        comment = self.comment
        if self.policy is not None:
            tags = f"p={self.policy}"
            if disposition is not None:
                tags += f" dis={disposition}"
            comment = f"{tags}, {comment}" if comment else tags
        return _resinfo("dmarc", self.result, comment, [("header.from", self.from_domain)])


@dataclass(slots=True)
class AuthResults:
    """Everything checked for one message, and the header value it gives."""

    spf: SPFResult | None = None
    dkim: list[DKIMResult] = field(default_factory=list)
    dkim_checked: bool = False
    #: DKIM signatures were there but not verified (message above max_message_size).
    dkim_skipped: bool = False
    dmarc: DMARCResult | None = None
    #: Authentication-Results fields already in the message that claim our authserv-id
    #: (forged, or from a previous pass); ours is on top of them.
    forged: int = 0

    def header_value(self, authserv_id: str, dmarc_disposition: str | None = None) -> str:
        parts = []
        if self.spf is not None:
            parts.append(self.spf.resinfo())
        if self.dkim_checked:
            parts.extend([r.resinfo() for r in self.dkim] or ["dkim=none"])
        if self.dmarc is not None:
            parts.append(self.dmarc.resinfo(dmarc_disposition))
        return "; ".join([_value(authserv_id), *(parts or ["none"])])

    def summary(self) -> str:
        items = []
        if self.spf is not None:
            items.append(f"spf={self.spf.result}")
        if self.dkim_checked:
            dkims = ",".join(r.result for r in self.dkim) or "none"
            items.append(f"dkim={dkims}")
        if self.dmarc is not None:
            items.append(f"dmarc={self.dmarc.result}")
        return " ".join(items) or "nothing checked"


# --- Authentication-Results syntax (RFC 8601 2.2) ------------------------------------------

_TSPECIALS = set('()<>@,;:\\"/[]?=')


def _value(text: str) -> str:
    """A property value: a token when it is one, else a quoted-string."""
    if (
        text
        and text.isascii()
        and all(c.isprintable() and c != " " and c not in _TSPECIALS for c in text)
    ):
        return text
    cleaned = "".join(c for c in text if c.isprintable())
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str, limit: int = 120) -> str:
    """A comment without parentheses, escapes, semicolons (for naive parsers that split
    on them) or line breaks."""
    cleaned = "".join(c if c.isprintable() and c not in "()\\" else " " for c in text)
    cleaned = " ".join(cleaned.replace(";", ",").split())
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3].rstrip() + "..."
    return cleaned


def _resinfo(method: str, result: str, comment: str, props: Sequence[tuple[str, str]]) -> str:
    out = f"{method}={result}"
    comment = _comment(comment)
    if comment:
        out += f" ({comment})"
    for name, text in props:
        if text:
            out += f" {name}={_value(text)}"
    return out


# --- SPF ------------------------------------------------------------------------------------

_spf_thread = threading.local()
_spf_original: Callable[..., Any] | None = None
_spf_install_lock = threading.Lock()


def _install_spf_lookup() -> None:
    """Route pyspf's module-level DNS function through :func:`_spf_dns` (once)."""
    global _spf_original
    with _spf_install_lock:
        if _spf_original is None:
            _spf_original = spf.DNSLookup
            spf.DNSLookup = _spf_dns


def _spf_dns(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[Any]:
    """pyspf's DNSLookup interface: [((name, type), value)], TXT values as lists of bytes,
    MX as (preference, host). Uses the lookup of the check running in this thread."""
    lookup: Lookup | None = getattr(_spf_thread, "lookup", None)
    if lookup is None:  # not one of our checks: pyspf's own resolver, as before
        assert _spf_original is not None
        return list(_spf_original(name, qtype, strict, timeout))
    try:
        answers = lookup(name, qtype)
    except DNSTempError as exc:
        raise spf.TempError(f"DNS {exc}") from None
    out: list[Any] = []
    for answer in answers:
        if qtype in ("TXT", "SPF"):
            out.append(((name, qtype), [answer.encode("utf-8")]))
        elif qtype == "MX":
            preference, _, host = answer.partition(" ")
            out.append(((name, qtype), (int(preference), host)))
        else:
            out.append(((name, qtype), answer))
    return out


def check_spf(lookup: Lookup, ip: str, sender: str, helo: str, receiver: str = "") -> SPFResult:
    """SPF for the MAIL FROM identity, or for HELO when ``sender`` is empty (blocking)."""
    identity = "mailfrom" if sender else "helo"
    domain = (sender.rpartition("@")[2] if "@" in sender else sender) if sender else helo
    domain = domain.strip().rstrip(".").lower()
    if not _is_domain(domain):
        return SPFResult("none", identity, "", "no domain to check")
    _install_spf_lookup()
    _spf_thread.lookup = lookup
    try:
        try:
            query = spf.query(
                ip, sender, helo, receiver=receiver or "unknown", querytime=SPF_TIME_LIMIT
            )
        except spf.PermError as exc:  # not an IP address pyspf understands
            return SPFResult("permerror", identity, domain, str(exc))
        result, _code, explanation = query.check()
    except Exception as exc:  # a bug in the library must not refuse mail: no verdict
        log.warning("SPF check for %s from %s failed: %r", domain, ip, exc)
        return SPFResult("temperror", identity, domain, "SPF check failed")
    finally:
        _spf_thread.lookup = None
    if result == "pass":
        comment = f"{domain}: {ip} is allowed"
    elif result in ("fail", "softfail"):
        comment = f"{domain}: {ip} is not allowed"
    elif result == "none":
        comment = f"{domain}: no SPF record"
    else:
        comment = str(explanation)
    return SPFResult(str(result), identity, domain, comment)


_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)\Z")


def _is_domain(name: str) -> bool:
    if not name or len(name) > 253 or "." not in name:
        return False
    try:
        ipaddress.ip_address(name.strip("[]"))
        return False  # an address literal is no domain
    except ValueError:
        pass
    return all(_LABEL.match(label) or not label.isascii() for label in name.split("."))


# --- DKIM -----------------------------------------------------------------------------------


class _DKIMTempError(Exception):
    """Raised through dkimpy (which does not catch it) for a temporary DNS error."""


def _dkim_dnsfunc(lookup: Lookup) -> Callable[..., bytes | None]:
    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            answers = lookup(text.rstrip("."), "TXT")
        except DNSTempError as exc:
            raise _DKIMTempError(str(exc)) from None
        if not answers:
            return None
        # RFC 6376 3.6.2.2: several records are not expected; prefer one with a key.
        keys = [a for a in answers if "p=" in a]
        return (keys or answers)[0].encode("utf-8")

    return dnsfunc


def _dkim_logger() -> logging.Logger:
    # dkimpy logs key problems at ERROR; they are results here, not errors of ours.
    return logging.getLogger("mailgate.policy.mail_auth.dkimpy")


def verify_dkim(lookup: Lookup, message: bytes) -> list[DKIMResult]:
    """Verify every DKIM-Signature of ``message`` (up to MAX_SIGNATURES; blocking)."""
    try:
        verifier = dkim.DKIM(message, logger=_dkim_logger(), minkey=1024)
    except dkim.DKIMException as exc:
        return [DKIMResult("permerror", comment=f"unparseable message: {exc}")]
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    dnsfunc = _dkim_dnsfunc(lookup)
    return [_verify_one(verifier, index, dnsfunc) for index in range(min(count, MAX_SIGNATURES))]


def _verify_one(verifier: Any, index: int, dnsfunc: Callable[..., bytes | None]) -> DKIMResult:
    raw = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"][index]
    domain, selector, b = _signature_ids(raw)
    try:
        prep = verifier.verify_headerprep(index)
    except Exception as exc:  # MessageFormatError, ValidationError, odd values
        return DKIMResult("neutral", domain, selector, b, f"bad signature: {exc}")
    if not prep:
        return DKIMResult("neutral", domain, selector, b, "bad signature")
    sig, include_headers, sig_headers = prep
    name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
    try:
        key = dkim.load_pk_from_dns(name, dnsfunc, timeout=5)
    except _DKIMTempError as exc:
        return DKIMResult("temperror", domain, selector, b, f"key lookup: {exc}")
    except dkim.KeyFormatError as exc:
        text = str(exc)
        problem = "no key for signature" if "missing public key" in text else f"bad key: {text}"
        return DKIMResult("permerror", domain, selector, b, problem)
    except (dkim.DKIMException, binascii.Error, ValueError) as exc:
        return DKIMResult("neutral", domain, selector, b, f"unusable key: {exc}")
    verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt = key
    try:
        good = verifier.verify_sig_process(sig, include_headers, sig_headers[index], dnsfunc)
    except dkim.ValidationError as exc:
        if "body hash mismatch" in str(exc):
            return DKIMResult("fail", domain, selector, b, "body hash mismatch")
        return DKIMResult("neutral", domain, selector, b, str(exc))
    except dkim.KeyFormatError as exc:
        return DKIMResult("permerror", domain, selector, b, str(exc))
    except Exception as exc:  # dkimpy raises assorted errors for odd input
        return DKIMResult("neutral", domain, selector, b, f"cannot verify: {exc}")
    if good:
        return DKIMResult("pass", domain, selector, b)
    return DKIMResult("fail", domain, selector, b, "signature does not verify")


def _signature_ids(raw: bytes) -> tuple[str, str, str]:
    """d=, s= and the start of b= from a DKIM-Signature value, leniently."""
    tags: dict[str, str] = {}
    for part in raw.decode("utf-8", "replace").split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), "".join(value.split()))
    return tags.get("d", "").lower(), tags.get("s", ""), tags.get("b", "")[:8]


# --- DMARC ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DMARCRecord:
    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


_DMARC_START = re.compile(r"v\s*=\s*DMARC1\s*(;|\Z)")
_POLICIES = ("none", "quarantine", "reject")


def parse_dmarc(text: str) -> DMARCRecord | None:
    """A DMARC TXT record (RFC 7489 6.3), or None when it is not a usable one."""
    if not _DMARC_START.match(text.strip()):
        return None
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), value.strip())
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        # 6.6.3: without a valid p=, act as p=none if reports are asked for, else ignore.
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", "").lower()
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    return DMARCRecord(
        p=p,
        sp=sp if sp in _POLICIES else p,
        adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r",
        pct=min(max(pct, 0), 100),
    )


def _dmarc_record(lookup: Lookup, domain: str) -> DMARCRecord | None:
    records = [r for r in lookup(f"_dmarc.{domain}", "TXT") if _DMARC_START.match(r.strip())]
    if len(records) != 1:  # 6.6.3: none, or several, means no DMARC for this domain
        return None
    return parse_dmarc(records[0])


def from_domains(headers: Iterable[tuple[bytes, bytes]]) -> list[str] | str:
    """The RFC5322.From domains, or a reason why there is no usable From (permerror)."""
    values = [v for n, v in headers if n.strip().lower() == b"from"]
    if len(values) != 1:
        return "no From header" if not values else "several From headers"
    text = values[0].replace(b"\r", b"").replace(b"\n", b"").decode("utf-8", "replace")
    domains: list[str] = []
    for _name, address in email.utils.getaddresses([text]):
        domain = address.rpartition("@")[2].strip().rstrip(".").lower() if "@" in address else ""
        if not domain:
            return "From without a domain"
        if not _is_domain(domain):
            return "From domain is not a domain name"
        if domain not in domains:
            domains.append(domain)
    return domains or "From without an address"


def aligned(domain: str, from_domain: str, mode: str) -> bool:
    """Identifier alignment (RFC 7489 3.1): strict is equality, relaxed the same
    organizational domain."""
    domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not domain:
        return False
    if mode == "s":
        return domain == from_domain
    return org_domain(domain) == org_domain(from_domain)


def evaluate_dmarc(
    lookup: Lookup,
    from_domain: str,
    spf_result: SPFResult | None,
    dkim_results: Sequence[DKIMResult],
    sample: Callable[[], float] = random.random,
) -> DMARCResult:
    """DMARC for one From domain (blocking): policy discovery (the domain, then its
    organizational domain), alignment, the policy that applies and pct= sampling."""
    try:
        record = _dmarc_record(lookup, from_domain)
        policy_domain = from_domain
        if record is None:
            org = org_domain(from_domain)
            if org != from_domain:
                record, policy_domain = _dmarc_record(lookup, org), org
    except DNSTempError as exc:
        return DMARCResult("temperror", from_domain, comment=f"DMARC record lookup: {exc}")
    if record is None:
        return DMARCResult("none", from_domain)
    policy = record.p if policy_domain == from_domain else record.sp
    spf_pass = (
        spf_result is not None
        and spf_result.result == "pass"
        and aligned(spf_result.domain, from_domain, record.aspf)
    )
    dkim_pass = any(
        r.result == "pass" and aligned(r.domain, from_domain, record.adkim) for r in dkim_results
    )
    if spf_pass or dkim_pass:
        return DMARCResult("pass", from_domain, policy, policy)
    temp = (
        spf_result is not None
        and spf_result.result == "temperror"
        and aligned(spf_result.domain, from_domain, record.aspf)
    ) or any(
        r.result == "temperror" and aligned(r.domain, from_domain, record.adkim)
        for r in dkim_results
    )
    if temp:
        return DMARCResult("temperror", from_domain, policy, "none", "aligned check failed")
    applied = policy
    if record.pct < 100 and sample() * 100 >= record.pct:  # 6.6.4: next policy down
        applied = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
    return DMARCResult("fail", from_domain, policy, applied)


_RANK = {"fail": 0, "temperror": 1, "permerror": 2, "none": 3, "pass": 4}
_SEVERITY = {"reject": 0, "quarantine": 1, "none": 2}


def _worst(results: Sequence[DMARCResult]) -> DMARCResult:
    return min(results, key=lambda r: (_RANK.get(r.result, 5), _SEVERITY.get(r.applied or "", 3)))


# --- organizational domains (RFC 7489 3.2) ---------------------------------------------------


class _SuffixList:
    """The public suffix list that authheaders ships, as sets of rules (normal, wildcard,
    exception), with the default rule ``*``: an unknown top-level domain is a public
    suffix of its own."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.rules: set[str] = set()
        self.wildcards: set[str] = set()
        self.exceptions: set[str] = set()
        for line in lines:
            rule = line.strip().split(" ")[0].lower() if line.strip() else ""
            if not rule or rule.startswith("//"):
                continue
            for form in _idna_forms(rule.lstrip("!")):
                if rule.startswith("!"):
                    self.exceptions.add(form)
                elif form.startswith("*."):
                    self.wildcards.add(form[2:])
                else:
                    self.rules.add(form)

    def suffix_labels(self, labels: list[str]) -> int:
        best = 1
        for i in range(len(labels)):
            suffix = ".".join(labels[i:])
            if suffix in self.exceptions:
                return len(labels) - i - 1
            if suffix in self.rules:
                best = max(best, len(labels) - i)
            if i > 0 and suffix in self.wildcards:
                best = max(best, len(labels) - i + 1)
        return best


def _idna_forms(rule: str) -> set[str]:
    forms = {rule}
    if not rule.isascii():
        with contextlib.suppress(UnicodeError):
            forms.add(
                ".".join(
                    label if label == "*" else label.encode("idna").decode("ascii")
                    for label in rule.split(".")
                )
            )
    return forms


_psl: _SuffixList | None = None
_psl_lock = threading.Lock()


def _suffix_list() -> _SuffixList:
    global _psl
    with _psl_lock:
        if _psl is None:
            try:
                ref = importlib.resources.files("authheaders") / "public_suffix_list.txt"
                with ref.open("r", encoding="utf-8") as f:
                    _psl = _SuffixList(f)
            except (OSError, ModuleNotFoundError) as exc:
                log.warning("no public suffix list (%s): organizational domains are guesses", exc)
                _psl = _SuffixList(())
        return _psl


def org_domain(domain: str) -> str:
    """The organizational domain: one label more than the public suffix."""
    labels = [label for label in domain.lower().rstrip(".").split(".") if label]
    if not labels:
        return ""
    keep = _suffix_list().suffix_labels(labels) + 1
    return ".".join(labels[-keep:]) if keep < len(labels) else ".".join(labels)


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


def _header_fields(data: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields of a message (its header section only is parsed)."""
    end = re.search(rb"\r?\n\r?\n", data)
    head = data[: end.end()] if end else data + b"\r\n"
    try:
        headers, _body = dkim.rfc822_parse(head)
    except dkim.DKIMException:
        return []
    return [(bytes(n), bytes(v)) for n, v in headers]


def _authserv_of(value: bytes) -> str:
    text = value.replace(b"\r", b"").replace(b"\n", b"").decode("utf-8", "replace")
    text = re.sub(r"\([^()]*\)", " ", text)  # comments (not nested: enough for this)
    return text.split(";", 1)[0].strip().strip('"').split(" ")[0].lower()


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
        headers = _header_fields(data)
        authserv = self.authserv_id.lower()
        results.forged = sum(
            1
            for n, v in headers
            if n.strip().lower() == b"authentication-results" and _authserv_of(v) == authserv
        )
        if self.dkim:
            results.dkim_checked = True
            if complete:
                results.dkim = verify_dkim(lookup, data)
            else:
                signatures = [v for n, v in headers if n.strip().lower() == b"dkim-signature"]
                results.dkim = [
                    DKIMResult("policy", *_signature_ids(v), comment="message too large to verify")
                    for v in signatures[:MAX_SIGNATURES]
                ]
                results.dkim_skipped = bool(signatures)
        if self.dmarc:
            domains = from_domains(headers)
            if isinstance(domains, str):
                results.dmarc = DMARCResult("permerror", comment=domains)
            else:
                results.dmarc = _worst(
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
    "NOTES_KEY",
    "QUARANTINE_HEADER",
    "AuthResults",
    "DKIMResult",
    "DMARCRecord",
    "DMARCResult",
    "MailAuth",
    "SPFResult",
    "aligned",
    "check_spf",
    "evaluate_dmarc",
    "from_domains",
    "org_domain",
    "parse_dmarc",
    "plugins_from_options",
    "verify_dkim",
]
