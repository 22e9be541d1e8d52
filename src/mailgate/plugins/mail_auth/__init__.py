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

The package: :mod:`.spf`, :mod:`.dkim` and :mod:`.dmarc` evaluate (blocking calls into
pyspf and dkimpy, results as dataclasses, every DNS lookup through the function they are
given); :mod:`.domains` and :mod:`.header` hold what they share (domain syntax and
organizational domains; the Authentication-Results syntax); :mod:`.plugin` is the
:class:`MailAuth` plugin (stages, replies, the header). This module gives the names
applications and tests use.

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

from .dkim import MAX_SIGNATURES, ARCResult, DKIMResult, verify_arc, verify_dkim
from .dmarc import DMARCRecord, DMARCResult, aligned, evaluate_dmarc, from_domains, parse_dmarc
from .domains import Lookup, org_domain
from .plugin import (
    DEFAULT_MAX_MESSAGE_SIZE,
    MAX_FROM_DOMAINS,
    MAX_HEADER_BYTES,
    NOTES_KEY,
    POLICY,
    QUARANTINE_HEADER,
    AuthResults,
    MailAuth,
    plugins_from_options,
    read_for_check,
)
from .spf import SPF_TIME_LIMIT, SPFResult, check_spf

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MAX_FROM_DOMAINS",
    "MAX_HEADER_BYTES",
    "MAX_SIGNATURES",
    "NOTES_KEY",
    "POLICY",
    "QUARANTINE_HEADER",
    "SPF_TIME_LIMIT",
    "ARCResult",
    "AuthResults",
    "DKIMResult",
    "DMARCRecord",
    "DMARCResult",
    "Lookup",
    "MailAuth",
    "SPFResult",
    "aligned",
    "check_spf",
    "evaluate_dmarc",
    "from_domains",
    "org_domain",
    "parse_dmarc",
    "plugins_from_options",
    "read_for_check",
    "verify_arc",
    "verify_dkim",
]
