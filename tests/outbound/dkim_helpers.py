"""DKIM and ARC checks the way a receiver makes them: dkimpy verifying against the keys
published as TXT records in the test DNS zone, looked up with dnspython from the test DNS
server (dkimpy's ``dnsfunc``), and a receiving SMTP server that refuses what fails."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import dns.exception
import dns.resolver
from aiosmtpd.smtp import SMTP, Envelope, Session
from tests.dns_server import DNSTestServer
from tests.outbound.receivers import Receiver, _Handler

from mailgate.queue.dkim_keys import (
    Algorithm,
    generate_key,
    txt_record,
    write_key_file,
    zone_line,
)


def txt_lookup(dns_server: DNSTestServer) -> Any:
    """dkimpy's ``dnsfunc``: the TXT record of a name, asked of the test DNS server with
    dnspython (None when there is none)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = dns_server.port

    def get_txt(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode("ascii").rstrip("."), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.exception.Timeout):
            return None
        rrset = answer.rrset
        if rrset is None:
            return None
        return b"".join(next(iter(rrset)).strings)

    return get_txt


def make_key(
    dns_server: DNSTestServer,
    directory: Path,
    domain: str,
    selector: str,
    algorithm: Algorithm = "rsa-sha256",
    *,
    publish: bool = True,
) -> Path:
    """A new key in ``directory``, its public half published at
    ``selector._domainkey.domain`` in the test zone."""
    key = generate_key(algorithm)
    path = directory / f"{domain}.{selector}.key"
    directory.mkdir(parents=True, exist_ok=True)
    write_key_file(path, key, overwrite=True)
    if publish:
        dns_server.add(zone_line(selector, domain, txt_record(key)) + "\n")
    return path


@dataclass(frozen=True)
class Signature:
    domain: str
    selector: str
    algorithm: str
    valid: bool


def _tag(value: bytes, tag: str) -> str:
    found = re.search(rb"(?:^|;)\s*" + tag.encode() + rb"\s*=\s*([^;]*)", value)
    return re.sub(rb"\s+", b"", found.group(1)).decode() if found else ""


def dkim_signatures(data: bytes, dnsfunc: Any) -> list[Signature]:
    """Every DKIM-Signature of the message, top first, each verified."""
    checker = dkim.DKIM(data, minkey=1024)
    fields = [value for name, value in checker.headers if name.lower() == b"dkim-signature"]
    results = []
    for index, value in enumerate(fields):
        try:
            valid = bool(checker.verify(idx=index, dnsfunc=dnsfunc))
        except dkim.DKIMException:
            valid = False
        results.append(Signature(_tag(value, "d"), _tag(value, "s"), _tag(value, "a"), valid))
    return results


def arc_result(data: bytes, dnsfunc: Any) -> tuple[str, str]:
    """dkimpy's ARC chain validation (``pass``, ``fail``, ``none``) and its reason."""
    cv, _, reason = dkim.arc_verify(data, dnsfunc=dnsfunc)
    return cv.decode(), reason


class _VerifyingHandler(_Handler):
    def __init__(self, receiver: VerifyingReceiver) -> None:
        super().__init__(receiver)
        self.verifying = receiver

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = bytes(envelope.original_content or b"")
        signatures = dkim_signatures(data, self.verifying.dnsfunc)
        with self.verifying.lock:
            self.verifying.attempts.append(data)
        if self.verifying.require_dkim and not (
            signatures and all(signature.valid for signature in signatures)
        ):
            return "550 5.7.20 No passing DKIM signature found"
        return str(await super().handle_DATA(server, session, envelope))


class VerifyingReceiver(Receiver):
    """A receiving server that checks every DKIM signature of each message against the
    test zone and, with ``require_dkim``, refuses one without a signature or with one
    that fails (550 5.7.20, RFC 7372), as strict receivers do. ``attempts``: the bytes of
    every message that reached the end of DATA, refused or not."""

    def __init__(
        self, host: str, port: int, dns_server: DNSTestServer, *, require_dkim: bool = True
    ) -> None:
        super().__init__(host, port)
        self.dnsfunc = txt_lookup(dns_server)
        self.require_dkim = require_dkim
        self.attempts: list[bytes] = []
        self._controller.handler = _VerifyingHandler(self)
