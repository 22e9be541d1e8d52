"""Block and allow lists: client networks, sender and recipient addresses, HELO names.

Configured by the ``[lists]`` table (or ``Lists(...)`` in code). Each list is given inline,
in a file (one entry per line, ``#`` or ``;`` comments, blank lines ignored), or both;
files are read again on SIGHUP (:meth:`Lists.reload`), and a file that is broken or gone
at that point leaves the list loaded before in place.

What happens:

* connect: a client in ``allow_networks`` is allow-listed (:func:`mark_allowlisted`), so
  the DNSBL, greylisting and rate checks skip it, and it skips ``block_helo`` and
  ``block_senders`` too. Otherwise a client in ``block_networks`` gets the banner
  ``554 Client host [ip] rejected: Access denied`` and is disconnected. Allow beats block.
* HELO/EHLO: a name matching ``block_helo`` gets ``550 5.7.1`` (the client may try again).
* MAIL: a sender in ``allow_senders`` allow-lists this transaction only; a sender in
  ``block_senders`` gets ``550 5.7.1``. The null sender ``<>`` matches only an explicit
  ``<>`` entry.
* RCPT: a recipient in ``block_recipients`` gets ``550 5.7.1``, whoever sends.

Lookups cost the same however long the lists are: networks are merged per family
(:func:`ipaddress.collapse_addresses`) and searched by bisection, addresses and domains are
set lookups (walking up the labels for ``*.example.com``), HELO names a set lookup and one
compiled pattern that cannot backtrack badly.
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, cast

from mailgate.hooks import Address, Envelope, Reject, Session
from mailgate.plugins.policy import (
    ALLOWLISTED,
    PolicyConfigError,
    PolicyEnv,
    RefusalText,
    SectionReader,
    decide,
    mark_allowlisted,
    normalise_domain,
    refusal,
)
from mailgate.server.options import Network, PolicySection

log = logging.getLogger("mailgate.policy")

POLICY = "lists"
ACCESS_DENIED = "Access denied"

T = TypeVar("T")
M = TypeVar("M")

# --- networks --------------------------------------------------------------------------------


def parse_network(text: str) -> Network:
    """An IP address or CIDR network; IPv4-mapped IPv6 networks become IPv4 ones."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or network (CIDR)") from None
    return _unmap(network)


def _unmap(network: Network) -> Network:
    """``::ffff:192.0.2.0/120`` is ``192.0.2.0/24``: peers are compared in IPv4 form."""
    if (
        isinstance(network, ipaddress.IPv6Network)
        and network.prefixlen >= 96
        and network.network_address.ipv4_mapped is not None
    ):
        return ipaddress.IPv4Network(
            (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
        )
    return network


class _Ranges:
    """The merged networks of one address family, as sorted [start, end] integer ranges."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks: list[Network] = list(ipaddress.collapse_addresses(networks))  # type: ignore[type-var]
        self.starts = [int(n.network_address) for n in self.networks]
        self.ends = [int(n.broadcast_address) for n in self.networks]

    def find(self, value: int) -> Network | None:
        index = bisect.bisect_right(self.starts, value) - 1
        if index >= 0 and value <= self.ends[index]:
            return self.networks[index]
        return None


class NetworkList:
    """IPv4 and IPv6 networks. :meth:`match` gives the (merged) network holding an
    address; an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) matches IPv4 entries."""

    def __init__(self, networks: Iterable[Network | str] = ()) -> None:
        v4: list[Network] = []
        v6: list[Network] = []
        for item in networks:
            network = parse_network(item) if isinstance(item, str) else _unmap(item)
            (v4 if network.version == 4 else v6).append(network)
        self._v4 = _Ranges(v4)
        self._v6 = _Ranges(v6)

    @property
    def networks(self) -> tuple[Network, ...]:
        """The merged networks, IPv4 first."""
        return (*self._v4.networks, *self._v6.networks)

    def __len__(self) -> int:
        return len(self._v4.networks) + len(self._v6.networks)

    def match(self, ip: str) -> Network | None:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is None:
                return self._v6.find(int(address))
            address = address.ipv4_mapped
        return self._v4.find(int(address))


# --- addresses and domains -------------------------------------------------------------------


def _local(local: str) -> str:
    """A local part for comparison: a quoted one unquoted (``"john"`` is ``john``),
    lower case (lists compare addresses without regard to case)."""
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return local.lower()


def _split(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    return (local, domain) if at else (address, "")


Kind = Literal["null", "address", "local", "domain", "subdomains"]


@dataclass(frozen=True, slots=True)
class AddressEntry:
    """One entry of a sender or recipient list."""

    kind: Kind
    value: str

    def __str__(self) -> str:
        if self.kind == "null":
            return "<>"
        if self.kind == "local":
            return f"{self.value}@"
        if self.kind == "subdomains":
            return f"*.{self.value}"
        return self.value


def parse_address_entry(text: str, *, null: bool = True) -> AddressEntry:
    """``user@example.com`` (that address), ``example.com`` or ``@example.com`` (every
    address at that domain), ``*.example.com`` or ``.example.com`` (every address at its
    subdomains), ``user@`` (that local part at any domain), ``<>`` (the null sender; only
    where ``null`` is true)."""
    entry = text.strip()
    if entry != "<>" and entry.startswith("<") and entry.endswith(">"):
        entry = entry[1:-1].strip()
    if entry == "<>":
        if not null:
            raise ValueError("'<>' (the null sender) only makes sense in a sender list")
        return AddressEntry("null", "")
    if not entry:
        raise ValueError("empty entry")
    if any(c.isspace() for c in entry):
        raise ValueError(f"{text!r}: an entry cannot contain spaces")
    if "@" not in entry:
        return _domain_entry(entry, text)
    local, domain = _split(entry)
    if "*" in local:
        raise ValueError(f"{text!r}: wildcards are only for domains (*.example.com)")
    if not local:
        return _domain_entry(domain, text)
    if not domain:
        return AddressEntry("local", _local(local))
    if "*" in domain:
        raise ValueError(
            f"{text!r}: a wildcard domain is only for whole domains; "
            "use *.example.com (every address at its subdomains)"
        )
    return AddressEntry("address", f"{_local(local)}@{_check_domain(domain, text)}")


def _domain_entry(domain: str, text: str) -> AddressEntry:
    if domain.startswith("*."):
        return AddressEntry("subdomains", _check_domain(domain[2:], text))
    if domain.startswith(".") and not domain.startswith(".."):
        return AddressEntry("subdomains", _check_domain(domain[1:], text))
    return AddressEntry("domain", _check_domain(domain, text))


def _check_domain(domain: str, text: str) -> str:
    name = normalise_domain(domain)
    if "*" in name:
        raise ValueError(f"{text!r}: '*' may only start a domain (*.example.com)")
    if not name.startswith("[") and (not name or "" in name.split(".")):
        raise ValueError(f"{text!r} is not an address or domain")
    return name


class AddressList:
    """Sender or recipient entries (:func:`parse_address_entry`); :meth:`match` gives the
    entry an address matches, or None. Case does not matter."""

    def __init__(self, entries: Iterable[AddressEntry | str] = (), *, null: bool = True) -> None:
        self.null = False
        self.addresses: set[str] = set()
        self.locals: set[str] = set()
        self.domains: set[str] = set()
        self.parents: set[str] = set()
        for item in entries:
            entry = item if isinstance(item, AddressEntry) else parse_address_entry(item, null=null)
            if entry.kind == "null":
                self.null = True
            elif entry.kind == "address":
                self.addresses.add(entry.value)
            elif entry.kind == "local":
                self.locals.add(entry.value)
            elif entry.kind == "domain":
                self.domains.add(entry.value)
            else:
                self.parents.add(entry.value)

    def __len__(self) -> int:
        sets = (self.addresses, self.locals, self.domains, self.parents)
        return int(self.null) + sum(len(s) for s in sets)

    def match(self, address: str) -> str | None:
        """The entry ``address`` matches (as text, for logs), or None. ``""`` is the null
        sender, which only an explicit ``<>`` entry matches."""
        if not address:
            return "<>" if self.null else None
        raw_local, raw_domain = _split(str(address))
        local = _local(raw_local)
        domain = normalise_domain(raw_domain)
        if self.addresses and f"{local}@{domain}" in self.addresses:
            return f"{local}@{domain}"
        if local in self.locals:
            return f"{local}@"
        if domain in self.domains:
            return domain
        if self.parents and not domain.startswith("["):
            labels = domain.split(".")
            for i in range(1, len(labels)):
                parent = ".".join(labels[i:])
                if parent in self.parents:
                    return f"*.{parent}"
        return None


# --- HELO names ------------------------------------------------------------------------------


def parse_helo_pattern(text: str) -> str:
    """A HELO name or glob (``*`` any run of characters, dots included; ``?`` one
    character; nothing else is special, so ``[192.0.2.1]`` is literal)."""
    pattern = normalise_domain(text)
    if not pattern:
        raise ValueError("empty entry")
    if any(c.isspace() for c in pattern):
        raise ValueError(f"{text!r}: an entry cannot contain spaces")
    if not pattern.strip("*"):
        raise ValueError(f"{text!r} would match every name")
    return pattern


def _glob_regex(pattern: str) -> str:
    """A regular expression for a glob that matches in linear time: each middle part is
    taken at its first occurrence, atomically (for globs the first occurrence is always
    the best one), so no pattern can make a long HELO name backtrack."""

    def literal(part: str) -> str:
        return "".join("." if c == "?" else re.escape(c) for c in part)

    parts = pattern.split("*")
    if len(parts) == 1:
        return literal(pattern)
    middle = "".join(f"(?>.*?{literal(part)})" for part in parts[1:-1] if part)
    return f"{literal(parts[0])}{middle}.*{literal(parts[-1])}"


class HeloList:
    """HELO/EHLO names and globs (:func:`parse_helo_pattern`), without regard to case."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.exact: set[str] = set()
        self.globs: list[str] = []
        for item in patterns:
            pattern = parse_helo_pattern(item)
            if "*" in pattern or "?" in pattern:
                if pattern not in self.globs:
                    self.globs.append(pattern)
            else:
                self.exact.add(pattern)
        self._regex = (
            re.compile(
                "|".join(f"(?P<g{i}>{_glob_regex(p)})" for i, p in enumerate(self.globs)),
                re.DOTALL,
            )
            if self.globs
            else None
        )

    def __len__(self) -> int:
        return len(self.exact) + len(self.globs)

    def match(self, name: str) -> str | None:
        """The entry ``name`` matches, or None."""
        name = normalise_domain(name)
        if name in self.exact:
            return name
        if self._regex is not None:
            found = self._regex.fullmatch(name)
            if found is not None and found.lastgroup is not None:
                return self.globs[int(found.lastgroup[1:])]
        return None


# --- list files ------------------------------------------------------------------------------

# A comment starts at "#" or ";" at the start of a line or after white space ("#" is a
# valid character inside an address; ";" comments are the Spamhaus DROP format).
_COMMENT = re.compile(r"(?:^|\s)[#;].*")


def read_list_file(path: Path, parse: Callable[[str], T]) -> list[T]:
    """The entries of a list file: one per line, comments and blank lines skipped. A bad
    line raises :class:`PolicyConfigError` naming ``path:line``."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise PolicyConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise PolicyConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    entries: list[T] = []
    for number, line in enumerate(text.split("\n"), 1):
        entry = _COMMENT.sub("", line).strip()
        if not entry:
            continue
        if any(c.isspace() for c in entry):
            raise PolicyConfigError(f"{path}:{number}: expected one entry per line, got {entry!r}")
        try:
            entries.append(parse(entry))
        except ValueError as exc:
            raise PolicyConfigError(f"{path}:{number}: {exc}") from None
    return entries


@dataclass
class _Source(Generic[T, M]):
    """Where one list comes from: entries given inline and an optional file."""

    key: str
    inline: list[T]
    path: Path | None
    parse: Callable[[str], T]
    build: Callable[[list[T]], M]

    def load(self) -> M:
        entries = list(self.inline)
        if self.path is not None:
            try:
                entries += read_list_file(self.path, self.parse)
            except PolicyConfigError as exc:
                raise PolicyConfigError(f"{self.key}_file: {exc}") from None
        return self.build(entries)


def _inline(
    key: str, items: Iterable[Any], parse: Callable[[str], T], parsed: tuple[type, ...] = ()
) -> list[T]:
    """Entries given in code or the table: strings, or objects of the ``parsed`` types
    (networks from :func:`ipaddress.ip_network`)."""
    if isinstance(items, str):
        items = [items]
    out: list[T] = []
    for item in items:
        if isinstance(item, parsed):
            out.append(cast(T, item))  # already parsed (a network object)
        elif not isinstance(item, str):
            raise PolicyConfigError(f"{key}: expected strings, got {item!r}")
        else:
            try:
                out.append(parse(item))
            except ValueError as exc:
                raise PolicyConfigError(f"{key}: {exc}") from None
    return out


# --- the plugin ------------------------------------------------------------------------------


@dataclass
class _State:
    """What the plugin remembers about one session (``session.notes["lists"]``)."""

    peer: str | None = None  # the client address the network lists were checked for
    client: str | None = None  # allow-listed by allow_networks: why
    sender: str | None = None  # this transaction allow-listed by allow_senders: why
    written: str | None = None  # what we last put into notes[ALLOWLISTED]


NETWORK_LISTS = ("block_networks", "allow_networks")
NAME_LISTS = ("block_senders", "allow_senders", "block_recipients", "block_helo")
LISTS = (*NETWORK_LISTS, *NAME_LISTS)

PathLike = str | Path | None


class Lists:
    """Block and allow lists (see the module documentation). Every argument is optional;
    ``*_file`` arguments name files read now and again on :meth:`reload`."""

    name = "lists"

    block_networks: NetworkList
    allow_networks: NetworkList
    block_senders: AddressList
    allow_senders: AddressList
    block_recipients: AddressList
    block_helo: HeloList

    def __init__(
        self,
        *,
        block_networks: Iterable[Network | str] = (),
        allow_networks: Iterable[Network | str] = (),
        block_senders: Iterable[str] = (),
        allow_senders: Iterable[str] = (),
        block_recipients: Iterable[str] = (),
        block_helo: Iterable[str] = (),
        block_networks_file: PathLike = None,
        allow_networks_file: PathLike = None,
        block_senders_file: PathLike = None,
        allow_senders_file: PathLike = None,
        block_recipients_file: PathLike = None,
        block_helo_file: PathLike = None,
        client_refusal: RefusalText | None = None,
    ) -> None:
        #: The reply for a client in ``block_networks`` instead of ``554 5.7.1 Client host
        #: [IP] rejected: Access denied`` (a honeypot persona's words); the connection is
        #: closed after it either way.
        self.client_refusal = client_refusal

        def path(value: PathLike) -> Path | None:
            return None if value is None else Path(value)

        def sender(text: str) -> AddressEntry:
            return parse_address_entry(text, null=True)

        def recipient(text: str) -> AddressEntry:
            return parse_address_entry(text, null=False)

        def networks(key: str, items: Iterable[Any], file: PathLike) -> _Source[Any, Any]:
            inline = _inline(
                key, items, parse_network, (ipaddress.IPv4Network, ipaddress.IPv6Network)
            )
            return _Source(key, inline, path(file), parse_network, NetworkList)

        self._sources: dict[str, _Source[Any, Any]] = {
            "block_networks": networks("block_networks", block_networks, block_networks_file),
            "allow_networks": networks("allow_networks", allow_networks, allow_networks_file),
            "block_senders": _Source(
                "block_senders",
                _inline("block_senders", block_senders, sender),
                path(block_senders_file),
                sender,
                AddressList,
            ),
            "allow_senders": _Source(
                "allow_senders",
                _inline("allow_senders", allow_senders, sender),
                path(allow_senders_file),
                sender,
                AddressList,
            ),
            "block_recipients": _Source(
                "block_recipients",
                _inline("block_recipients", block_recipients, recipient),
                path(block_recipients_file),
                recipient,
                AddressList,
            ),
            "block_helo": _Source(
                "block_helo",
                _inline("block_helo", block_helo, parse_helo_pattern),
                path(block_helo_file),
                parse_helo_pattern,
                HeloList,
            ),
        }
        for key, source in self._sources.items():
            setattr(self, key, source.load())
        log.info("policy lists: loaded %s", self.summary())

    @classmethod
    def from_section(
        cls,
        section: PolicySection,
        env: PolicyEnv | None = None,
        *,
        client_refusal: RefusalText | None = None,
    ) -> Lists:
        """The plugin for a ``[lists]`` table; errors name the table and key (and the
        file and line for a bad line in a list file). ``client_refusal``: see the
        constructor."""
        reader = SectionReader(section)
        settings: dict[str, Any] = {}
        for key in NETWORK_LISTS:
            settings[key] = reader.networks(key)
        for key in NAME_LISTS:
            settings[key] = reader.strings(key)
        for key in LISTS:
            settings[f"{key}_file"] = reader.path(f"{key}_file")
        reader.done()
        try:
            return cls(**settings, client_refusal=client_refusal)
        except PolicyConfigError as exc:
            raise PolicyConfigError(f"{section.source} {exc}") from None

    def summary(self) -> str:
        """How many entries each list holds (after merging networks), for the logs."""
        sizes = [f"{key} {len(getattr(self, key))}" for key in LISTS if len(getattr(self, key))]
        return ", ".join(sizes) or "no entries"

    def reload(self) -> None:
        """Read every list file again (SIGHUP). A file that cannot be read or has a bad
        line leaves its list as it was; the others are still reloaded, then the error is
        raised (the server logs it)."""
        errors = []
        for key, source in self._sources.items():
            if source.path is None:
                continue
            try:
                setattr(self, key, source.load())
            except PolicyConfigError as exc:
                errors.append(f"{exc}; keeping the list loaded before")
        log.info("policy lists: reloaded %s", self.summary())
        if errors:
            raise PolicyConfigError("; ".join(errors))

    # --- stages --------------------------------------------------------------------------------

    async def on_connect(self, session: Session) -> None:
        self._check_client(session)

    async def on_helo(self, session: Session, hostname: str) -> None:
        state = self._check_client(session)
        if state.sender is not None:  # HELO/EHLO ends a transaction
            state.sender = None
            _publish(session, state)
        entry = self.block_helo.match(hostname) if len(self.block_helo) else None
        if entry is None:
            return
        _refuse_unless_allowed(
            session,
            state,
            f"HELO {hostname} matches block_helo {entry}",
            f"<{hostname}>: Helo command rejected: {ACCESS_DENIED}",
            list="block_helo",
            entry=entry,
            helo=hostname,
        )

    async def on_mail(self, session: Session, envelope: Envelope, address: Address) -> None:
        state = self._check_client(session)
        state.sender = None
        allowed = self.allow_senders.match(address) if len(self.allow_senders) else None
        if allowed is not None:
            state.sender = f"allow_senders {allowed}"
            _publish(session, state)
            decide(
                session,
                POLICY,
                "accept",
                f"sender <{address}> in allow_senders {allowed}",
                list="allow_senders",
                entry=allowed,
                sender=str(address),
            )
            return
        _publish(session, state)
        entry = self.block_senders.match(address) if len(self.block_senders) else None
        if entry is None:
            return
        _refuse_unless_allowed(
            session,
            state,
            f"sender <{address}> in block_senders {entry}",
            f"<{address}>: Sender address rejected: {ACCESS_DENIED}",
            list="block_senders",
            entry=entry,
            sender=str(address),
        )

    async def on_rcpt(self, session: Session, envelope: Envelope, address: Address) -> None:
        self._check_client(session)
        entry = self.block_recipients.match(address) if len(self.block_recipients) else None
        if entry is None:
            return
        decide(
            session,
            POLICY,
            "reject",
            f"recipient <{address}> in block_recipients {entry}",
            list="block_recipients",
            entry=entry,
            rcpt=str(address),
        )
        raise Reject(
            550, f"<{address}>: Recipient address rejected: {ACCESS_DENIED}", enhanced="5.7.1"
        )

    async def on_reset(self, session: Session, envelope: Envelope) -> None:
        state = session.notes.get(POLICY)
        if isinstance(state, _State) and state.sender is not None:
            state.sender = None
            _publish(session, state)

    # --- helpers -------------------------------------------------------------------------------

    def _check_client(self, session: Session) -> _State:
        """Look the client up once per address: at connect, and again if XCLIENT changed
        the address later (a front end in allow_networks must not allow-list the clients
        it forwards)."""
        state = session.notes.get(POLICY)
        if not isinstance(state, _State):
            state = session.notes[POLICY] = _State()
        ip = session.peer_host
        if state.peer == ip:
            return state
        state.peer, state.client = ip, None
        allowed = self.allow_networks.match(ip) if len(self.allow_networks) else None
        blocked = self.block_networks.match(ip) if len(self.block_networks) else None
        if allowed is not None:
            state.client = f"allow_networks {allowed}"
            _publish(session, state)
            also = f" (also in block_networks {blocked})" if blocked is not None else ""
            decide(
                session,
                POLICY,
                "accept",
                f"client {ip} in allow_networks {allowed}{also}",
                list="allow_networks",
                entry=str(allowed),
            )
            return state
        _publish(session, state)
        if blocked is not None:
            decide(
                session,
                POLICY,
                "reject",
                f"client {ip} in block_networks {blocked}",
                list="block_networks",
                entry=str(blocked),
            )
            if self.client_refusal is not None:
                raise refusal(self.client_refusal(session), disconnect=True)
            raise Reject(
                554,
                f"Client host [{ip}] rejected: {ACCESS_DENIED}",
                enhanced="5.7.1",
                disconnect=True,
            )
        return state


def _refuse_unless_allowed(
    session: Session, state: _State, why: str, text: str, **fields: Any
) -> None:
    """A block-list match: refused (550 5.7.1 ``text``), unless the client is
    allow-listed, which is logged as a skip."""
    if state.client is not None:
        decide(session, POLICY, "skip", f"{why}, but allow-listed: {state.client}", **fields)
        return
    decide(session, POLICY, "reject", why, **fields)
    raise Reject(550, text, enhanced="5.7.1")


def _publish(session: Session, state: _State) -> None:
    """Keep ``notes[ALLOWLISTED]`` in step with the lists' own reasons (the client's
    first, else this transaction's sender's), without touching a mark another plugin
    set."""
    current = session.notes.get(ALLOWLISTED)
    if current is not None and current != state.written:
        return
    want = state.client or state.sender
    if want:
        mark_allowlisted(session, want)
    else:
        session.notes.pop(ALLOWLISTED, None)
    state.written = want


def plugins_from_options(env: PolicyEnv) -> list[Any]:
    section = env.section("lists")
    if section is None:
        return []
    return [Lists.from_section(section, env)]


__all__ = [
    "ACCESS_DENIED",
    "AddressEntry",
    "AddressList",
    "HeloList",
    "Lists",
    "NetworkList",
    "parse_address_entry",
    "parse_helo_pattern",
    "parse_network",
    "plugins_from_options",
    "read_list_file",
]
