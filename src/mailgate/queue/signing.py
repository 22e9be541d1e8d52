"""DKIM signatures (RFC 6376, Ed25519 by RFC 8463) and ARC seals (RFC 8617) on the mail
mailgate sends onward.

The ``[[dkim_sign]]`` tables (one per key; several may sign one message, e.g. an RSA and
an Ed25519 key of one domain) and the optional ``[arc_seal]`` table are read here into
one :class:`MessageSigner`. The queue calls it once per message, when the message is
queued (after every step that changes the message: the Received field, the
Authentication-Results of the mail checks): the signed message is what the queue stores,
so a retry sends the same bytes and never signs again.

Who is signed for (see docs/outbound.md):

* DKIM signs only mail of the server's own users: a client that authenticated (SMTP
  AUTH) or connected from ``relay_networks``. Mail from anyone else that is relayed or
  forwarded is never signed with the domain's key: a forged ``From:`` must not gain a
  valid signature.
* Among those messages, an entry signs when one item of its ``match`` list matches:
  ``sender-domain`` (the default): the author's domain (the ``From:`` address, else the
  envelope sender) is ``domain`` or a subdomain of it; ``*``: every message;
  ``example.org`` / ``*.example.org`` / ``alice@example.org``: the author's domain, its
  subdomains, one address; ``user:alice`` / ``user:*``: the SMTP AUTH user.
* The delivery reports mailgate writes (from ``MAILER-DAEMON@<hostname>``) are matched
  as mail of its users.
* ARC seals the other messages, those received from outside, when they carry the
  Authentication-Results field of this server (the mail checks of ``[mail_auth]``): it
  becomes the ARC-Authentication-Results of the new ARC set.
"""

from __future__ import annotations

import base64
import email.utils
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any, Final

import dkim as dkimpy  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from mailgate.server.options import PolicySection
from mailgate.settings import (
    ConfigError,
    Network,
    Value,
    build_fields,
    converters,
    did_you_mean,
    required,
    setting,
    settings_of,
)

from .dkim_keys import ALGORITHMS, Algorithm, KeyFileError, SigningKey, load_signing_key

__all__ = [
    "ARC_TABLE",
    "DKIM_TABLE",
    "ArcSealSettings",
    "DkimSignSettings",
    "MessageSigner",
    "SenderFacts",
    "message_signer",
]

log = logging.getLogger("mailgate.queue")

DKIM_TABLE: Final = "dkim_sign"
ARC_TABLE: Final = "arc_seal"
#: The default ``match``: the author's domain is ``domain`` or under it.
SENDER_DOMAIN: Final = "sender-domain"
#: Both tables are relaxed/relaxed: it survives the re-folding and whitespace changes of
#: the relays between mailgate and the receiver, which simple/simple does not.
_CANONICALIZE: Final = (b"relaxed", b"relaxed")
#: Header fields RFC 6376 5.4 says not to sign (dkimpy refuses them too).
_NEVER_SIGNED: Final = frozenset(
    {"return-path", "received", "comments", "keywords", "bcc", "resent-bcc", "dkim-signature"}
)


def _selector(value: Value) -> str:
    name = converters.string(value).strip().lower()
    if not converters.is_host_name(name):
        raise value.error(f"{name!r} is not a selector (one or more DNS labels, e.g. s2026)")
    return name


def _headers(value: Value) -> tuple[str, ...]:
    names = [name.strip().lower() for name in converters.string_list(value)]
    for name in names:
        if not name or not name.isascii() or any(c in name for c in ": \t"):
            raise value.error(f"{name!r} is not a header field name")
        if name in _NEVER_SIGNED:
            raise value.error(f"{name} must not be signed (RFC 6376 5.4)")
    if "from" not in names:
        raise value.error("must include from (RFC 6376 5.4: the From field is always signed)")
    return tuple(names)


def _match(value: Value) -> tuple[str, ...]:
    items = [item.strip() for item in converters.string_list(value)]
    if not items:
        raise value.error(f'needs at least one item (the default is ["{SENDER_DOMAIN}"])')
    for item in items:
        _MatchItem.parse(item, value)
    return tuple(items)


_HEADERS_DEFAULT = (
    "From (signed twice, so that a second From cannot be added), Sender, Reply-To, To, Cc, "
    "Subject, Date, Message-ID, In-Reply-To, References, MIME fields, Resent-*, List-* "
    "(those present)"
)


@dataclass(frozen=True, slots=True)
class DkimSignSettings:
    """One ``[[dkim_sign]]`` table: a key that signs the matching messages."""

    domain: str = required(
        convert=converters.hostname,
        help="the signing domain (d=): the author's domain or a parent of it, for DMARC",
        group="dkim_sign",
        missing="[[dkim_sign]] needs the signing domain",
        metavar="DOMAIN",
    )
    selector: str = required(
        convert=_selector,
        help="the selector (s=): the key's record is the TXT of <selector>._domainkey.<domain>",
        group="dkim_sign",
        missing="[[dkim_sign]] needs a selector",
        metavar="NAME",
    )
    key_file: Path = required(
        convert=converters.path,
        help="the private key (PEM; what mailgate dkim keygen writes); read at start and on SIGHUP",
        group="dkim_sign",
        missing="[[dkim_sign]] needs the private key file",
        metavar="FILE",
    )
    algorithm: Algorithm = setting(
        "rsa-sha256",
        convert=converters.choice(ALGORITHMS),
        help="the key's algorithm; an RSA and an Ed25519 entry for one domain sign every "
        "message twice (RFC 8463)",
        group="dkim_sign",
        choices=ALGORITHMS,
    )
    headers: tuple[str, ...] | None = setting(
        None,
        convert=_headers,
        help="header fields to sign (h=), from included; a name listed twice is also "
        "signed where absent, so it cannot be added later",
        group="dkim_sign",
        metavar="[NAME, ...]",
        default_text=_HEADERS_DEFAULT,
    )
    match: tuple[str, ...] = setting(
        (SENDER_DOMAIN,),
        convert=_match,
        help='which messages of your users this key signs: "sender-domain" (the From '
        'domain is domain or under it), "*" (all), domains, "*.domain", addresses, '
        '"user:NAME" / "user:*" (the SMTP AUTH user); one match is enough',
        group="dkim_sign",
        metavar="[ITEM, ...]",
    )


@dataclass(frozen=True, slots=True)
class ArcSealSettings:
    """The ``[arc_seal]`` table: the key that seals the mail forwarded from outside."""

    domain: str = required(
        convert=converters.hostname,
        help="the sealing domain (d= of ARC-Seal and ARC-Message-Signature)",
        group="arc_seal",
        missing="[arc_seal] needs the sealing domain",
        metavar="DOMAIN",
    )
    selector: str = required(
        convert=_selector,
        help="the selector: the key's record is the TXT of <selector>._domainkey.<domain>",
        group="arc_seal",
        missing="[arc_seal] needs a selector",
        metavar="NAME",
    )
    key_file: Path = required(
        convert=converters.path,
        help="the RSA private key (ARC signs with rsa-sha256 only, RFC 8617 4.1.3)",
        group="arc_seal",
        missing="[arc_seal] needs the private key file",
        metavar="FILE",
    )
    authserv_id: str | None = setting(
        None,
        convert=converters.hostname,
        help="whose Authentication-Results become the ARC-Authentication-Results",
        group="arc_seal",
        metavar="NAME",
        default_text="[mail_auth] authserv_id, else hostname",
    )
    headers: tuple[str, ...] | None = setting(
        None,
        convert=_headers,
        help="header fields the ARC-Message-Signature signs",
        group="arc_seal",
        metavar="[NAME, ...]",
        default_text="as for [[dkim_sign]]",
    )


# --- matching -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SenderFacts:
    """What decides whether a message is signed, and by which entries."""

    #: The author: the first address of ``From:``, else the envelope sender ("" for none).
    author: str
    #: The SMTP AUTH user, None when the client did not authenticate.
    user: str | None
    #: The client authenticated or is in ``relay_networks``: mail of the server's users.
    ours: bool


@dataclass(frozen=True, slots=True)
class _MatchItem:
    kind: str  # "sender-domain", "any", "domain", "parent", "address", "user", "any-user"
    text: str = ""

    @classmethod
    def parse(cls, item: str, value: Value | None = None) -> _MatchItem:
        lowered = item.lower()
        if lowered == SENDER_DOMAIN:
            return cls("sender-domain")
        if item == "*":
            return cls("any")
        if lowered.startswith("user:"):
            user = item[5:].strip()
            if not user:
                raise _match_error(value, item, "user: needs a name, or user:* for any")
            return cls("any-user") if user == "*" else cls("user", user)
        if "@" in item:
            local, _, domain = item.rpartition("@")
            if not local or not converters.is_host_name(domain.rstrip(".")):
                raise _match_error(value, item, "is not an address")
            # Local parts are compared without case, as every mailbox provider does.
            return cls("address", f"{local}@{domain.rstrip('.')}".lower())
        name = lowered.rstrip(".")
        if name.startswith("*."):
            if not converters.is_host_name(name[2:]):
                raise _match_error(value, item, "is not *.domain")
            return cls("parent", name[2:])
        if not converters.is_host_name(name):
            raise _match_error(
                value,
                item,
                f"is not {SENDER_DOMAIN}, *, a domain, *.domain, an address or user:NAME",
            )
        return cls("domain", name)

    def matches(self, facts: SenderFacts, signing_domain: str) -> bool:
        author_domain = facts.author.rpartition("@")[2].rstrip(".").lower()
        if self.kind == "sender-domain":
            return bool(author_domain) and _within(author_domain, signing_domain)
        if self.kind == "any":
            return True
        if self.kind == "domain":
            return author_domain == self.text
        if self.kind == "parent":
            return author_domain.endswith("." + self.text)
        if self.kind == "address":
            local, _, _ = facts.author.rpartition("@")
            return f"{local.lower()}@{author_domain}" == self.text
        if self.kind == "user":
            return facts.user == self.text
        return facts.user is not None  # any-user


def _match_error(value: Value | None, item: str, problem: str) -> ConfigError:
    text = f"{item!r} {problem}"
    return value.error(text) if value is not None else ConfigError(text)


def _within(name: str, domain: str) -> bool:
    domain = domain.rstrip(".").lower()
    return name == domain or name.endswith("." + domain)


# --- the signer -----------------------------------------------------------------------------


class _OpenSSLRSA:
    """Mixin over dkimpy's signers (``DKIM``, ``ARC``): the RSA step is made by
    ``cryptography`` (OpenSSL: about 1 ms for a 2048-bit key) instead of dkimpy's
    pure-Python arithmetic (about 10 ms, holding the GIL, which capped a relay at some
    100 signed messages a second). Everything else (canonicalization, which fields are
    hashed, folding) is dkimpy's: this is ``DomainSigner.gen_header`` of dkimpy 1.1 with
    its one RSA call replaced. The tests verify every signature with dkimpy itself."""

    openssl_key: rsa.RSAPrivateKey | None = None

    def gen_header(  # the signature of dkimpy's method
        self,
        fields: list[tuple[bytes, bytes]],
        include_headers: Sequence[bytes],
        canon_policy: Any,
        header_name: bytes,
        pk: Any,
        standardize: bool = False,
    ) -> bytes:
        this: Any = self
        key = self.openssl_key
        if key is None or this.signature_algorithm != b"rsa-sha256":
            result: bytes = super().gen_header(  # type: ignore[misc]
                fields, include_headers, canon_policy, header_name, pk, standardize
            )
            return result
        if standardize:
            lower = [(x, y.lower().replace(b" ", b"")) for (x, y) in fields if x != b"bh"]
            regular = [(x, y.replace(b" ", b"")) for (x, y) in fields if x == b"bh"]
            fields = sorted(lower + regular, key=lambda item: item[0])
        header_value = b"; ".join(b"=".join(item) for item in fields)
        if not standardize:
            header_value = dkimpy.fold(header_value, namelen=len(header_name), linesep=b"\r\n")
        header_value = dkimpy.RE_BTAG.sub(b"\\1", header_value)
        header = (header_name, b" " + header_value)
        digest = dkimpy.HashThrough(this.hasher(), this.debug_content)
        headers = canon_policy.canonicalize_headers(this.headers)
        this.signed_headers = dkimpy.hash_headers(
            digest, canon_policy, headers, include_headers, header, dict(fields)
        )
        signature = key.sign(digest.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        index = next(i for i, (tag, _) in enumerate(fields) if tag == b"b")
        fields[index] = (b"b", base64.b64encode(signature))
        header_value = b"; ".join(b"=".join(item) for item in fields) + bytes(this.linesep)
        if not standardize:
            header_value = dkimpy.fold(header_value, namelen=len(header_name), linesep=this.linesep)
        return bytes(header_value)


class _DKIM(_OpenSSLRSA, dkimpy.DKIM):  # type: ignore[misc]
    pass


class _ARC(_OpenSSLRSA, dkimpy.ARC):  # type: ignore[misc]
    pass


@dataclass(frozen=True, slots=True)
class _DkimKey:
    settings: DkimSignSettings
    key: SigningKey
    rules: tuple[_MatchItem, ...]
    where: str

    def matches(self, facts: SenderFacts) -> bool:
        return any(rule.matches(facts, self.settings.domain) for rule in self.rules)

    def label(self) -> str:
        """How the log names a signature of this key."""
        settings = self.settings
        return f"dkim d={settings.domain} s={settings.selector} {settings.algorithm}"

    def sign(self, message: bytes) -> bytes:
        settings = self.settings
        signer = _DKIM(message, signature_algorithm=settings.algorithm.encode("ascii"))
        signer.openssl_key = self.key.rsa_key
        if settings.headers:
            include = [name.encode("ascii") for name in settings.headers]
        else:
            include = list(signer.default_sign_headers())
            if b"from" not in (name.lower() for name in include):
                # A message without From (RFC 5322 wants one): signing its absence keeps
                # one from being added, and dkimpy signs nothing without it.
                include.append(b"from")
        signature: bytes = signer.sign(
            settings.selector.encode("ascii"),
            settings.domain.encode("ascii"),
            self.key.dkimpy_key,
            canonicalize=_CANONICALIZE,
            include_headers=include,
        )
        return signature


@dataclass(frozen=True, slots=True)
class _ArcKey:
    settings: ArcSealSettings
    key: SigningKey
    authserv_id: str

    def seal(self, message: bytes) -> bytes:
        """The ARC set for ``message`` (b"" when it carries no Authentication-Results of
        ``authserv_id``, or an ARC chain whose result is not known): dkimpy's
        ``arc_sign`` with the RSA step of :class:`_OpenSSLRSA`."""
        sealer = _ARC(message, signature_algorithm=b"rsa-sha256")
        sealer.openssl_key = self.key.rsa_key
        headers = self.settings.headers
        include = (
            [name.encode("ascii") for name in headers] if headers else sealer.default_sign_headers()
        )
        fields: list[bytes] = sealer.sign(
            self.settings.selector.encode("ascii"),
            self.settings.domain.encode("ascii"),
            self.key.dkimpy_key,
            self.authserv_id.encode("ascii"),
            include_headers=include,
        )
        return b"".join(fields)


@dataclass(frozen=True)
class MessageSigner:
    """The keys of ``[[dkim_sign]]`` and ``[arc_seal]``, read; :meth:`sign` gives the
    header fields to put on top of a message."""

    dkim: tuple[_DkimKey, ...] = ()
    arc: _ArcKey | None = None
    relay_networks: tuple[Network, ...] = field(default=())

    def __bool__(self) -> bool:
        return bool(self.dkim) or self.arc is not None

    def is_ours(self, client: str, authenticated: bool) -> bool:
        """Mail of the server's users: authenticated, or from ``relay_networks``."""
        if authenticated:
            return True
        try:
            address = ipaddress.ip_address(client.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d (as the relay
            # policy does, judged as IPv4).
            address = address.ipv4_mapped
        return any(address in network for network in self.relay_networks)

    def sign(
        self, message: bytes, *, envelope_sender: str, client: str, user: str | None
    ) -> tuple[bytes, list[str]]:
        """The DKIM-Signature fields (in the order of the tables) or the ARC set to
        prepend to ``message`` (b"" when nothing applies), and what they are for the
        log (``dkim example.com s1``). A message that cannot be signed (a malformed
        header section) raises dkimpy's DKIMException."""
        facts = SenderFacts(
            author=author_of(message) or envelope_sender,
            user=user,
            ours=self.is_ours(client, user is not None),
        )
        added = b""
        what: list[str] = []
        if facts.ours:
            for entry in self.dkim:
                if entry.matches(facts):
                    added += entry.sign(message)
                    what.append(entry.label())
        elif self.arc is not None:
            seal = self.arc.seal(message)
            if seal:
                added += seal
                what.append(f"arc d={self.arc.settings.domain} s={self.arc.settings.selector}")
        return added, what

    def sign_local(self, message: bytes, user: str | None = None) -> tuple[bytes, list[str]]:
        """The DKIM signatures for a message that did not come over SMTP: a delivery
        report mailgate wrote (from ``MAILER-DAEMON@<hostname>``) or one handed to
        ``mailgate sendmail`` (``user``: the login of whoever ran it). Both are mail of
        the server's users; the entries match them as any other. Never ARC-sealed."""
        facts = SenderFacts(author=author_of(message), user=user, ours=True)
        added = b""
        what: list[str] = []
        for entry in self.dkim:
            if entry.matches(facts):
                added += entry.sign(message)
                what.append(entry.label())
        return added, what

    def describe(self) -> list[str]:
        """One line per key, for the start-up log."""
        lines = [
            f"DKIM signing for {entry.settings.domain} with selector "
            f"{entry.settings.selector} ({entry.key.describe()}; match "
            f"{', '.join(entry.settings.match)})"
            for entry in self.dkim
        ]
        if self.arc is not None:
            lines.append(
                f"ARC sealing as {self.arc.settings.domain} with selector "
                f"{self.arc.settings.selector} (Authentication-Results of {self.arc.authserv_id})"
            )
        return lines


def author_of(message: bytes) -> str:
    """The first address of the ``From:`` field ("" without one)."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(message, headersonly=True)
    value = headers.get("From")
    if value is None:
        return ""
    addresses = email.utils.getaddresses([str(value)])
    return next((address for _, address in addresses if "@" in address), "")


# --- reading the tables ---------------------------------------------------------------------


def _values(section: PolicySection, known: Sequence[str]) -> dict[str, Value]:
    values: dict[str, Value] = {}
    for key, raw in section.values.items():
        if key not in known:
            raise ConfigError(
                f"{section.source}: unknown key {key!r}{did_you_mean(key, list(known))}"
            )
        values[key] = Value(raw, f"{section.source} {key}", section.base)
    return values


def _fields(section: PolicySection, options_class: type, table: str) -> dict[str, Any]:
    items = settings_of(options_class)
    values = _values(section, [item.key for item in items])
    for item in items:
        if item.is_required and item.key not in values:
            raise ConfigError(f"{section.source}: {item.missing}: add {item.key} = ...")
    return build_fields(options_class, values, table=table)


def _read_key(section: PolicySection, key_file: Path, algorithm: Algorithm) -> SigningKey:
    where = f"{section.source} key_file"
    try:
        return load_signing_key(key_file, algorithm)
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot read {key_file}: {exc.strerror or exc} "
            f"(make one with: mailgate dkim keygen)"
        ) from None
    except KeyFileError as exc:
        raise ConfigError(f"{where}: {key_file}: {exc}") from None


def message_signer(
    sections: Iterable[PolicySection],
    *,
    hostname: str,
    relay_networks: Sequence[Network] = (),
    read_keys: bool = True,
) -> MessageSigner | None:
    """The signer of the configuration's ``[[dkim_sign]]`` and ``[arc_seal]`` tables, with
    every key file read; None when there are neither. Raises ConfigError naming the
    table, its number and the key (``mailgate.toml [[dkim_sign]] #2 key_file: ...``).
    ``read_keys=False`` checks the tables only and returns None: for the commands that
    read the configuration without signing (``mailgate queue``), which may run as a user
    the keys are not readable by."""
    sections = list(sections)
    entries: list[_DkimKey] = []
    for section in (s for s in sections if s.name == DKIM_TABLE):
        settings = DkimSignSettings(**_fields(section, DkimSignSettings, DKIM_TABLE))
        rules = tuple(_MatchItem.parse(item) for item in settings.match)
        if read_keys:
            key = _read_key(section, settings.key_file, settings.algorithm)
            entries.append(_DkimKey(settings, key, rules, section.source))
    arc: _ArcKey | None = None
    arc_section = next((s for s in sections if s.name == ARC_TABLE), None)
    if arc_section is not None:
        arc_settings = ArcSealSettings(**_fields(arc_section, ArcSealSettings, ARC_TABLE))
        if read_keys:
            key = _read_key(arc_section, arc_settings.key_file, "rsa-sha256")
            authserv_id = arc_settings.authserv_id or _mail_auth_id(sections) or hostname
            arc = _ArcKey(arc_settings, key, authserv_id)
    if not entries and arc is None:
        return None
    return MessageSigner(tuple(entries), arc, tuple(relay_networks))


def _mail_auth_id(sections: Sequence[PolicySection]) -> str | None:
    """``[mail_auth] authserv_id``, which names this server in its Authentication-Results."""
    table = next((s for s in sections if s.name == "mail_auth"), None)
    raw = table.values.get("authserv_id") if table is not None else None
    return raw.strip() if isinstance(raw, str) and raw.strip() else None
