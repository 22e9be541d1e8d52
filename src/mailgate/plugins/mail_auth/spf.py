"""SPF (RFC 7208): one check of the MAIL FROM or HELO identity with pyspf, its DNS
lookups through the caller's :data:`~mailgate.plugins.mail_auth.domains.Lookup`.

pyspf (module ``spf``) looks names up through its module-level ``spf.DNSLookup``. It is
replaced once by a dispatcher that uses the lookup function of the check running in the
current thread (a thread-local), and falls back to pyspf's own lookup for anyone else in
the process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import spf as pyspf  # type: ignore[import-untyped]

from mailgate.dns import DNSTempError

from .domains import Lookup, is_domain
from .header import resinfo_text

log = logging.getLogger("mailgate.policy.mail_auth")

#: RFC 7208 4.6.4: at least 20 seconds for a whole SPF evaluation.
SPF_TIME_LIMIT = 20.0


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
        return resinfo_text("spf", self.result, self.comment, [(prop, self.domain)])


_spf_thread = threading.local()
_spf_original: Callable[..., Any] | None = None
_spf_install_lock = threading.Lock()


def _install_spf_lookup() -> None:
    """Route pyspf's module-level DNS function through :func:`_spf_dns` (once)."""
    global _spf_original
    with _spf_install_lock:
        if _spf_original is None:
            _spf_original = pyspf.DNSLookup
            pyspf.DNSLookup = _spf_dns


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
        raise pyspf.TempError(f"DNS {exc}") from None
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
    if not is_domain(domain):
        return SPFResult("none", identity, "", "no domain to check")
    _install_spf_lookup()
    _spf_thread.lookup = lookup
    try:
        try:
            query = pyspf.query(
                ip, sender, helo, receiver=receiver or "unknown", querytime=SPF_TIME_LIMIT
            )
        except pyspf.PermError as exc:  # not an IP address pyspf understands
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


__all__ = ["SPF_TIME_LIMIT", "SPFResult", "check_spf"]
