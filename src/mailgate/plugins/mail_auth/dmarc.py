"""DMARC (RFC 7489): policy discovery for the From domain (the domain, then its
organizational domain), identifier alignment with the SPF and DKIM results, the policy
that applies and pct= sampling. Done here rather than with authheaders, whose DMARC code
treats every unknown top-level domain as one organizational domain and lets DNS errors
escape."""

from __future__ import annotations

import email.utils
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from mailgate.dns import DNSTempError

from .dkim import DKIMResult
from .domains import Lookup, is_domain, org_domain
from .header import resinfo_text
from .spf import SPFResult


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
        return resinfo_text("dmarc", self.result, comment, [("header.from", self.from_domain)])


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
        if not is_domain(domain):
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


def worst(results: Sequence[DMARCResult]) -> DMARCResult:
    """The result of a message with several From domains: the worst one (fail first, and
    of equal results the strictest policy applied)."""
    return min(results, key=lambda r: (_RANK.get(r.result, 5), _SEVERITY.get(r.applied or "", 3)))


__all__ = [
    "DMARCRecord",
    "DMARCResult",
    "aligned",
    "evaluate_dmarc",
    "from_domains",
    "parse_dmarc",
    "worst",
]
