"""Everything the server needs to run, as one immutable value built by mailgate.config."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mailgate.protocol.config import BareNewline
from mailgate.protocol.persona import Persona

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str  # literal IP or name; IPv6 without brackets
    port: int
    implicit_tls: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PolicySection:
    """One policy table of the configuration (``[limits]``, one ``[[dnsbl]]`` entry...),
    unparsed: the plugin that owns it reads and checks it (``from_section``)."""

    name: str
    values: Mapping[str, Any]
    #: Directory relative paths in it are resolved against; None: the working directory.
    base: Path | None
    #: Where it came from, for error messages: "mailgate.toml [limits]" or "setting limits".
    source: str


#: Loopback may relay by default: the quick start sends from the same machine.
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True, slots=True)
class ServerOptions:
    listen: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 2525),)
    hostname: str = "localhost"
    # Where accepted mail goes: exactly one of these.
    delivery: Literal["maildir", "mbox", "sink"] = "maildir"
    maildir: Path = Path("maildir")
    mbox: Path | None = None
    state_dir: Path = Path(".mailgate")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Development credentials, user -> password.
    auth_users: tuple[tuple[str, str], ...] = ()
    allow_insecure_auth: bool = False
    max_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_clients: int = 1000
    max_clients_per_ip: int = 20
    max_command_line: int = 512
    max_unknown_commands: int = 10
    max_bad_commands: int = 20
    idle_timeout: float = 300.0
    data_timeout: float = 600.0
    close_timeout: float = 30.0
    #: Wait this long before the banner; clients that talk first get 554 (0: no wait).
    greeting_delay: float = 0.0
    lmtp: bool = False
    proxy_protocol: tuple[Network, ...] = ()
    proxy_timeout: float = 10.0
    workers: int = 1
    received_header: bool = True
    bare_newline: BareNewline = BareNewline.REJECT
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    #: Trusted peers that may use XCLIENT/XFORWARD.
    trusted_networks: tuple[Network, ...] = field(default_factory=tuple)
    # --- authentication --------------------------------------------------------------
    #: SASL mechanisms to offer; empty: what the registered auth plugins can check.
    auth_mechanisms: tuple[str, ...] = ()
    #: A users file with argon2 hashes (``mailgate users add``) for PLAIN and LOGIN.
    users_file: Path | None = None
    #: Honeypot-style auth that records every attempt: "refuse" or "accept" (None: off).
    auth_capture: Literal["refuse", "accept"] | None = None
    #: Seconds before the first failed AUTH reply; doubles with each further failure.
    auth_failure_delay: float = 1.0
    max_auth_failures: int = 3
    # --- hooks and deliveries --------------------------------------------------------------
    #: Longest a stage's hooks may take (message stage: delivery_timeout) before 451.
    hook_timeout: float = 30.0
    delivery_timeout: float = 300.0
    #: Forward every message to these servers: smtp://host:port, lmtp://host:port.
    forward: tuple[str, ...] = ()
    #: POST every message to these HTTP(S) endpoints.
    webhook: tuple[str, ...] = ()
    #: An aiosmtpd handler class to run, "module:Class" (with module importable).
    aiosmtpd_handler: str | None = None
    # --- policy --------------------------------------------------------------------------
    #: Domains we receive mail for (``*.example.com`` matches subdomains). Mail for other
    #: domains is relaying: allowed from authenticated users and relay_networks only
    #: (Postfix's mynetworks; not trusted_networks, which may send XCLIENT).
    local_domains: tuple[str, ...] = ()
    #: Accept mail for any domain from anyone (capture servers, honeypots): warned at start.
    open_relay: bool = False
    relay_networks: tuple[Network, ...] = LOOPBACK
    #: Name servers for policy lookups ("HOST" or "HOST:PORT"); empty: /etc/resolv.conf.
    dns_nameservers: tuple[str, ...] = ()
    dns_timeout: float = 3.0
    #: DNS blocklists in their simplest form: listed clients are refused at RCPT.
    dnsbl_zones: tuple[str, ...] = ()
    #: Greylisting with its defaults (the [greylisting] table gives the details).
    greylist: bool = False
    #: The policy tables of the configuration, for their plugins to read.
    policy: tuple[PolicySection, ...] = ()
    # --- presentation ------------------------------------------------------------------
    #: How the server words its replies, banner, EHLO greeting and HELP (honeypot
    #: personas); None: mailgate's own texts.
    persona: Persona | None = None
