"""Settings of the outbound delivery engine, as one frozen value."""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.dns.dnssec import DNSSEC_MODES, ROOT_TRUST_ANCHOR, DNSSECMode, parse_trust_anchor
from mailgate.settings import Value, code_only, converters, setting

from .tlspolicy import TLS_LEVELS, TLSLevel

#: The levels of ``tls_policy`` (see :mod:`.tlspolicy`): ``none``, ``may``, ``encrypt``,
#: ``verify``, ``dane``, ``mta-sts``, with Postfix's meanings. (The old names.)
TLSPolicy = TLSLevel
TLS_POLICIES: tuple[str, ...] = TLS_LEVELS


def _path_text(value: Value) -> str:
    return str(converters.path(value))


def _domain_levels(value: Value) -> tuple[tuple[str, TLSLevel], ...]:
    """``[outbound.tls_policies]``: ``"example.com" = "verify"``, ``".example.com"`` for
    every subdomain; each level one of :data:`TLS_LEVELS`."""
    raw = value.raw
    if not isinstance(raw, dict):
        raise value.error(
            'must be a table of domain = level, e.g. [outbound.tls_policies] "example.com" = "verify"'
        )
    levels: dict[str, TLSLevel] = {}
    for name, level in raw.items():
        domain = str(name).strip().lower().rstrip(".")
        subdomains = domain.startswith(".")
        try:
            bare = domain.removeprefix(".").encode("idna").decode("ascii")
        except UnicodeError:
            bare = ""
        if not bare or not converters.is_host_name(bare) or bare.replace(".", "").isdigit():
            raise value.error(
                f"{name!r} is not a domain (example.com, or .example.com for its subdomains)"
            )
        if not isinstance(level, str) or level.strip().lower() not in TLS_LEVELS:
            raise value.error(f"{name}: {level!r} is not one of {', '.join(TLS_LEVELS)}")
        levels[("." if subdomains else "") + bare] = level.strip().lower()  # type: ignore[assignment]  # checked
    return tuple(levels.items())


def _trust_anchors(value: Value) -> tuple[str, ...]:
    """DS or DNSKEY records in zone-file syntax, each checked."""
    anchors = tuple(text.strip() for text in converters.string_list(value) if text.strip())
    for text in anchors:
        try:
            parse_trust_anchor(text)
        except ValueError as exc:
            raise value.error(str(exc)) from None
    return anchors


@dataclass(frozen=True, slots=True)
class OutboundOptions:
    """How the engine talks to other servers. Times are seconds.

    The defaults follow Postfix's ``smtp`` client where it has one: 5 minutes per command,
    10 for the message, connection reuse for 300 s / 1,000 messages, 2 s idle close,
    destination concurrency 20 with a slow start at 5.
    """

    #: The EHLO/LHLO name (the composition layer passes the server's hostname).
    helo: str = setting(
        "localhost",
        convert=converters.hostname,
        help="the name mailgate gives in EHLO/LHLO",
        group="outbound",
        metavar="NAME",
        default_text="the server's hostname",
    )
    #: Port of MX hosts (25; another one only for tests and lab setups).
    port: int = setting(
        25,
        convert=converters.count,
        help="port of the receiving MX servers (25; another only for tests and labs)",
        group="outbound",
        metavar="PORT",
    )
    #: Local address to connect from (used for addresses of its family only).
    source_address: str | None = setting(
        None,
        convert=converters.string,
        help="local address to connect from (used for addresses of its family)",
        group="outbound",
        metavar="IP",
    )
    connect_timeout: float = setting(
        30.0,
        convert=converters.seconds,
        help="longest wait for a connection",
        group="outbound",
        metavar="SECONDS",
    )
    #: Greeting, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, RSET, each.
    command_timeout: float = setting(
        300.0,
        convert=converters.seconds,
        help="longest wait for the reply to each command",
        group="outbound",
        metavar="SECONDS",
    )
    #: Sending the message (each pause in the flow) and waiting for the reply to it.
    data_timeout: float = setting(
        600.0,
        convert=converters.seconds,
        help="longest pause while sending a message, and wait for its reply",
        group="outbound",
        metavar="SECONDS",
    )
    max_concurrency_per_destination: int = setting(
        20,
        convert=converters.count,
        help="connections at once to one destination (a domain or a smarthost)",
        group="outbound",
        metavar="N",
    )
    #: Where a destination's concurrency starts; it grows by 1/window per success.
    initial_concurrency: int = setting(
        5,
        convert=converters.count,
        help="where a destination's concurrency starts; it grows while deliveries succeed",
        group="outbound",
        metavar="N",
    )
    #: A connection is reused for at most this long and this many messages...
    connection_reuse_time: float = setting(
        300.0,
        convert=converters.seconds,
        help="a connection carries messages for at most this long",
        group="outbound",
        metavar="SECONDS",
    )
    connection_reuse_count: int = setting(
        1000,
        convert=converters.count,
        help="and at most this many messages",
        group="outbound",
        metavar="N",
    )
    #: ...and closed when idle for this long.
    connection_idle_time: float = setting(
        2.0,
        convert=converters.seconds,
        help="an unused cached connection is closed after this long",
        group="outbound",
        metavar="SECONDS",
    )
    tls_policy: TLSPolicy = setting(
        "may",
        convert=converters.choice(TLS_POLICIES),
        help=(
            "TLS of every destination without its own: none: never STARTTLS; may: STARTTLS "
            "when offered, plain text if it fails (and MTA-STS); encrypt: TLS or no delivery; "
            "verify: TLS with a trusted certificate naming the host; dane: DANE where "
            "published, else may; mta-sts: MTA-STS even when mta_sts is off"
        ),
        group="outbound",
        choices=TLS_POLICIES,
    )
    #: Per destination domain (``.example.com``: its subdomains), as (domain, level)
    #: pairs (hashable, like the rest); a route's ``tls`` wins.
    tls_policies: tuple[tuple[str, TLSPolicy], ...] = setting(
        (),
        convert=_domain_levels,
        help='TLS policy per recipient domain, a table: "example.com" = "verify" (".example.com": its subdomains)',
        group="outbound",
        metavar="TABLE",
        default_text="none",
    )
    #: CA certificates (PEM) that certificates are checked against (``verify``, MTA-STS,
    #: the log's verified/unverified, the HTTPS of MTA-STS policies); None: the system's.
    tls_cafile: str | None = setting(
        None,
        convert=_path_text,
        help="CA certificates servers (and MTA-STS policy hosts) are checked against; default: the system's",
        group="outbound",
        metavar="FILE",
    )
    #: RFC 8461 under ``may``: a domain's published policy makes TLS with a verified
    #: certificate and its MX names mandatory (``enforce``) or logged (``testing``).
    mta_sts: bool = setting(
        True,
        convert=converters.boolean,
        help="apply the MTA-STS policies domains publish under the may (and dane) levels",
        group="outbound",
        switch=True,
    )
    #: Port of ``https://mta-sts.<domain>/`` (443; another only for tests and labs).
    mta_sts_port: int = code_only(
        443, reason="the HTTPS port of policy hosts is 443 (RFC 8461); tests use another"
    )
    #: Where fetched MTA-STS policies are kept between restarts (None: memory only). The
    #: queue sets ``mta-sts.json`` in its directory.
    mta_sts_cache_file: str | None = code_only(
        None, reason="the queue puts it in its own directory"
    )
    #: How DNSSEC is known, for DANE (``dane``/``dane-only`` levels): ``off`` (DANE is
    #: never used: ``dane`` acts as ``may``), ``resolver`` (the AD bit of
    #: ``dns_nameservers``, which must validate and be reached over a trusted path, e.g. a
    #: resolver on this host), ``local`` (mailgate validates from ``dnssec_trust_anchors``).
    dnssec: DNSSECMode = setting(
        "off",
        convert=converters.choice(DNSSEC_MODES),
        help=(
            "how DNSSEC is known for DANE: off (dane acts as may); resolver: trust the AD "
            "bit of dns_nameservers (a validating resolver on a trusted path); local: "
            "mailgate validates from dnssec_trust_anchors"
        ),
        group="outbound",
        choices=DNSSEC_MODES,
    )
    #: Trust anchors of ``dnssec = "local"``: DS or DNSKEY records in zone-file syntax.
    dnssec_trust_anchors: tuple[str, ...] = setting(
        (ROOT_TRUST_ANCHOR,),
        convert=_trust_anchors,
        help="DS or DNSKEY records DNSSEC validation starts from (dnssec = local)",
        group="outbound",
        metavar="RECORD",
        default_text="the root zone's KSK-2017 DS record",
    )
    #: After a failed TLS handshake under ``may``, that host gets plain text this long.
    tls_fallback_time: float = setting(
        3600.0,
        convert=converters.seconds_or_zero,
        help="after a failed handshake under may, that host gets plain text this long",
        group="outbound",
        metavar="SECONDS",
    )
    #: Send AUTH credentials over a connection without TLS (never, unless set).
    allow_plaintext_auth: bool = setting(
        False,
        convert=converters.boolean,
        help="send smarthost credentials over a connection without TLS",
        group="outbound",
        switch=True,
    )
    #: After this many consecutive attempts without a session, a destination is
    #: suspended: one probe per ``dead_probe_interval``, everything else deferred at once.
    dead_after_failures: int = setting(
        5,
        convert=converters.count,
        help="attempts in a row without a session before a destination is suspended",
        group="outbound",
        metavar="N",
    )
    dead_probe_interval: float = setting(
        60.0,
        convert=converters.seconds,
        help="a suspended destination gets one probe this often",
        group="outbound",
        metavar="SECONDS",
    )
    #: Addresses tried per attempt, over all MX hosts (Postfix: smtp_mx_address_limit).
    mx_address_limit: int = setting(
        10,
        convert=converters.count,
        help="addresses tried per attempt, over every MX host",
        group="outbound",
        metavar="N",
    )
    #: Recipients per transaction: a request with more is sent as several transactions
    #: on the same session (Postfix: smtp_destination_recipient_limit, 50).
    max_recipients_per_transaction: int = setting(
        50,
        convert=converters.count,
        help="recipients per SMTP transaction; more are sent in further transactions on the same connection",
        group="outbound",
        metavar="N",
    )

    def __post_init__(self) -> None:
        if self.dnssec not in DNSSEC_MODES:
            raise ValueError(f"outbound dnssec must be one of {', '.join(DNSSEC_MODES)}")
        if self.dnssec == "local" and not self.dnssec_trust_anchors:
            raise ValueError(
                "outbound dnssec = local needs at least one dnssec_trust_anchors record"
            )
        if not self.helo or not self.helo.isascii() or any(c.isspace() for c in self.helo):
            raise ValueError(f"outbound helo {self.helo!r} must be one non-empty ASCII word")
        if not 0 < self.port < 65536:
            raise ValueError(f"outbound port {self.port} is out of range")
        for name in (
            "connect_timeout",
            "command_timeout",
            "data_timeout",
            "connection_reuse_time",
            "connection_idle_time",
            "dead_probe_interval",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"outbound {name} must be positive")
        if self.tls_fallback_time < 0:
            raise ValueError("outbound tls_fallback_time must not be negative")
        if self.max_concurrency_per_destination < 1:
            raise ValueError("outbound max_concurrency_per_destination must be at least 1")
        if not 1 <= self.initial_concurrency <= self.max_concurrency_per_destination:
            raise ValueError(
                "outbound initial_concurrency must be between 1 and max_concurrency_per_destination"
            )
        if self.connection_reuse_count < 1:
            raise ValueError("outbound connection_reuse_count must be at least 1")
        if self.dead_after_failures < 1:
            raise ValueError("outbound dead_after_failures must be at least 1")
        if self.max_recipients_per_transaction < 1:
            raise ValueError("outbound max_recipients_per_transaction must be at least 1")
        if self.mx_address_limit < 1:
            raise ValueError("outbound mx_address_limit must be at least 1")
        if not 0 < self.mta_sts_port < 65536:
            raise ValueError(f"outbound mta_sts_port {self.mta_sts_port} is out of range")
        if self.tls_policy not in TLS_POLICIES:
            raise ValueError(f"outbound tls_policy must be one of {', '.join(TLS_POLICIES)}")
