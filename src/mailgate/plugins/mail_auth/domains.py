"""Domain names for SPF and DMARC: the syntax check, and organizational domains
(RFC 7489 3.2) from the public suffix list that authheaders ships (no network access).
Also the one shape of DNS access the checks share, :data:`Lookup`."""

from __future__ import annotations

import contextlib
import importlib.resources
import ipaddress
import logging
import re
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger("mailgate.policy.mail_auth")

#: A blocking DNS lookup: (name, rdtype) -> answers as text; raises DNSTempError. The
#: plugin passes its resolver's ``sync_lookup`` (the configured ``dns_nameservers``).
Lookup = Callable[[str, str], list[str]]

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)\Z")


def is_domain(name: str) -> bool:
    """Whether ``name`` (lower case, no trailing dot) can be a mail domain: at least two
    labels, not an address literal."""
    if not name or len(name) > 253 or "." not in name:
        return False
    try:
        ipaddress.ip_address(name.strip("[]"))
        return False  # an address literal is no domain
    except ValueError:
        pass
    return all(_LABEL.match(label) or not label.isascii() for label in name.split("."))


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


__all__ = ["Lookup", "is_domain", "org_domain"]
