"""Address patterns of routing rules, and the index that finds the rules a recipient
may match without trying every rule.

Patterns: ``user@domain`` (one address), ``*@domain`` (every address of a domain),
``*@*.domain`` (every address of every subdomain, not of the domain itself: the same rule
as Postfix's ``.domain`` and relay control's ``*.domain``; list ``*@domain`` too for both),
``*`` (any address) and, for senders only, ``<>`` (the null reverse-path).

Comparison is case-insensitive for the whole address. Domains are compared in their
A-label form (``bücher.example`` and ``xn--bcher-kva.example`` are one domain). Local
parts are compared case-insensitively too, as Postfix's lookup tables do: a rule for
``Sales@`` that missed mail to ``sales@`` would surprise more than it would protect
(RFC 5321 allows case-sensitive local parts; almost no server uses them).
"""

from __future__ import annotations

import heapq
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Literal

from mailgate.plugins.policy import normalise_domain

NULL_SENDER: Final = "<>"
ANY: Final = "*"

PatternKind = Literal["address", "domain", "subdomains", "any", "null"]

# A domain after normalise_domain: LDH labels (underscore too: some internal names have
# it), or an address literal.
_DOMAIN = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
_LITERAL = re.compile(r"\[[^\[\]\s\\]+\]")
_LOCAL_FORBIDDEN = re.compile(r"[\s<>*\x00-\x1f\x7f]")

PATTERN_FORMS: Final = "user@domain, *@domain, *@*.domain or *"


class PatternError(ValueError):
    """A pattern that is none of the forms routing understands."""


def normalise_local(local: str) -> str:
    """A local part as patterns compare it: lower case; NFC for non-ASCII (SMTPUTF8)."""
    if local.isascii():
        return local.lower()
    return unicodedata.normalize("NFC", local).lower()


def split_address(text: str) -> tuple[str, str]:
    """``(local, domain)`` of an envelope address, both normalised; angle brackets
    around it are dropped. ``domain`` is "" for an address without one (``postmaster``)."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    local, at, domain = text.rpartition("@")
    if not at:
        return normalise_local(text), ""
    return normalise_local(local), normalise_domain(domain)


@dataclass(frozen=True, slots=True)
class AddressPattern:
    """One parsed pattern: its kind and the key it is looked up by (``local@domain`` for
    an address, the domain for ``*@domain`` and ``*@*.domain``; "" otherwise)."""

    text: str
    kind: PatternKind
    key: str


def parse_pattern(text: str, *, allow_null: bool) -> AddressPattern:
    """Parse one pattern; raises PatternError with what is wrong."""
    raw = text.strip()
    if raw == ANY:
        return AddressPattern(text, "any", "")
    if raw == NULL_SENDER:
        if not allow_null:
            raise PatternError("'<>' (the null sender) is a pattern for senders only")
        return AddressPattern(text, "null", "")
    if raw.startswith("<") and raw.endswith(">"):
        raw = raw[1:-1]  # an address written as in SMTP, <user@domain>
    local, at, domain = raw.rpartition("@")
    forms = PATTERN_FORMS + (" or <>" if allow_null else "")
    if not at or not local or not domain:
        raise PatternError(f"{text!r} is not a pattern ({forms})")
    kind: PatternKind
    if domain.startswith("*."):
        kind, domain = "subdomains", domain[2:]
        if local != ANY:
            raise PatternError(f"{text!r}: a *.domain pattern is for whole domains (*@*.{domain})")
    elif local == ANY:
        kind = "domain"
    else:
        kind = "address"
        if _LOCAL_FORBIDDEN.search(local):
            raise PatternError(
                f"{text!r}: the local part is * or a whole local part (no spaces, <, > or *)"
            )
    name = normalise_domain(domain)
    literal = kind != "subdomains" and _LITERAL.fullmatch(name)  # no subdomains of [192.0.2.1]
    if "*" in name or not (_DOMAIN.fullmatch(name) or literal):
        raise PatternError(f"{text!r}: {domain!r} is not a domain ({forms})")
    if kind == "address":
        return AddressPattern(text, kind, f"{normalise_local(local)}@{name}")
    return AddressPattern(text, kind, name)


def parent_domains(domain: str) -> Iterator[str]:
    """The proper parents of ``domain``, nearest first: a.b.c -> b.c, c."""
    start = domain.find(".")
    while start != -1:
        yield domain[start + 1 :]
        start = domain.find(".", start + 1)


class AddressSet:
    """The patterns of one rule's ``senders`` (or ``recipients``), as sets: a lookup
    costs a few dict probes whatever the number of patterns."""

    __slots__ = ("addresses", "any", "domains", "null", "parents", "patterns")

    def __init__(self, patterns: Iterable[AddressPattern]) -> None:
        self.patterns = tuple(patterns)
        self.addresses = {p.key for p in self.patterns if p.kind == "address"}
        self.domains = {p.key for p in self.patterns if p.kind == "domain"}
        self.parents = {p.key for p in self.patterns if p.kind == "subdomains"}
        self.any = any(p.kind == "any" for p in self.patterns)
        self.null = any(p.kind == "null" for p in self.patterns)

    def matching(self, local: str, domain: str) -> AddressPattern | None:
        """The first pattern that matches the (normalised) address, or None. ``local``
        and ``domain`` both empty: the null sender, which only ``<>`` and ``*`` match."""
        null = not local and not domain
        for pattern in self.patterns:
            if pattern.kind == "any":
                return pattern
            if null:
                if pattern.kind == "null":
                    return pattern
                continue
            if (
                (pattern.kind == "address" and pattern.key == f"{local}@{domain}")
                or (pattern.kind == "domain" and pattern.key == domain)
                or (pattern.kind == "subdomains" and pattern.key in parent_domains(domain))
            ):
                return pattern
        return None

    def contains(self, local: str, domain: str) -> bool:
        """Whether any pattern matches; the fast path of :meth:`matching`."""
        if self.any:
            return True
        if not local and not domain:
            return self.null
        if domain in self.domains or f"{local}@{domain}" in self.addresses:
            return True
        return bool(self.parents) and any(p in self.parents for p in parent_domains(domain))


class PatternIndex:
    """Rule positions by pattern, across all rules: the candidates for one address are
    the rules listing it, its domain, one of its parent domains, ``*`` (or ``<>`` for the
    null sender), plus the rules that have no such condition at all (``unconditioned``:
    rules without ``senders`` match every sender). Each list is in rule order; first
    match wins, so the caller stops at the first candidate whose other conditions hold."""

    def __init__(self) -> None:
        self.addresses: dict[str, list[int]] = {}
        self.domains: dict[str, list[int]] = {}
        self.parents: dict[str, list[int]] = {}
        self.any: list[int] = []
        self.null: list[int] = []
        self.unconditioned: list[int] = []

    def add(self, position: int, patterns: Iterable[AddressPattern] | None) -> None:
        """Index rule ``position`` (None: the rule has no such condition); positions must
        be added in increasing order."""
        if patterns is None:
            self.unconditioned.append(position)
            return
        for pattern in patterns:
            if pattern.kind == "any":
                target = self.any
            elif pattern.kind == "null":
                target = self.null
            else:
                table = {
                    "address": self.addresses,
                    "domain": self.domains,
                    "subdomains": self.parents,
                }[pattern.kind]
                target = table.setdefault(pattern.key, [])
            if not target or target[-1] != position:  # a pattern listed twice in one rule
                target.append(position)

    def lists(self, local: str | None, domain: str) -> list[list[int]]:
        """The non-empty position lists whose union is the candidates for an address;
        ``local`` None: the address is not known (only unconditioned rules); ("", ""):
        the null sender."""
        if local is None:
            found = [self.unconditioned]
        elif not local and not domain:
            found = [self.null, self.any, self.unconditioned]
        else:
            found = [
                self.addresses.get(f"{local}@{domain}") or [],
                self.domains.get(domain) or [],
                self.any,
                self.unconditioned,
            ]
            if self.parents:
                found.extend(self.parents.get(parent) or [] for parent in parent_domains(domain))
        return [positions for positions in found if positions]


def merged(lists: list[list[int]]) -> Iterator[int]:
    """The positions of ascending lists in ascending order, lazily: a long ``*`` list
    costs only what is read. A rule in two lists (it names both the address and its
    domain) comes twice: harmless, the first time decides."""
    if len(lists) == 1:
        return iter(lists[0])
    return heapq.merge(*lists)


__all__ = [
    "ANY",
    "NULL_SENDER",
    "PATTERN_FORMS",
    "AddressPattern",
    "AddressSet",
    "PatternError",
    "PatternIndex",
    "merged",
    "normalise_local",
    "parent_domains",
    "parse_pattern",
    "split_address",
]
