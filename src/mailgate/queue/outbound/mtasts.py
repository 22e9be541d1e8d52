"""MTA-STS (RFC 8461): the TLS policy a domain publishes over DNS and HTTPS.

For a destination domain ``D``: the TXT record ``_mta-sts.D`` (``v=STSv1; id=...``)
says a policy exists and names its version; the policy itself is fetched from
``https://mta-sts.D/.well-known/mta-sts.txt`` (certificate checked for that name against
``tls_cafile`` or the system's CAs, no redirects, at most 64 KiB, 200 only) and says
``mode`` (``enforce``, ``testing``, ``none``), the MX host patterns and ``max_age``.

Policies are cached for their ``max_age`` (in memory, and in ``mta_sts_cache_file`` when
set: the queue keeps it in its directory, so a restart does not forget them, which is
what protects the first delivery after a restart from a downgrade). A cached policy is
used as long as it is fresh and the TXT record's id is the same; a new id fetches the
policy again; no TXT record, or a lookup or a fetch that fails, leaves a fresh cached
policy in force (RFC 8461 5.1), and with none cached there is no policy.

``enforce`` makes every MX host that does not match the patterns unusable and requires
TLS with a certificate verified for the MX host name (``verify`` with method
``mta-sts``); ``testing`` delivers as before but logs each host or certificate that
would have failed; ``none`` is no policy. TLS-RPT (RFC 8460) reports are not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from mailgate.dns import DNSTempError, Resolver

from .options import OutboundOptions
from .tlspolicy import CAMatcher, DestinationPolicy, TLSRequirement

log = logging.getLogger("mailgate.queue.outbound")

Mode = Literal["enforce", "testing", "none"]
_MODES = ("enforce", "testing", "none")
#: RFC 8461 3.2: max_age is at most 31557600 s (about a year).
MAX_AGE_LIMIT = 31_557_600
#: RFC 8461 3.3: policies larger than this may be refused.
MAX_POLICY_BYTES = 64 * 1024
#: A fetch takes at most this long (the delivery waits for it).
FETCH_TIMEOUT = 20.0
#: After a failed fetch (no policy cached), the domain is not asked again for this long.
FAILURE_BACKOFF = 300.0
#: Policies kept at most (expired ones are dropped when this many are cached).
_MAX_POLICIES = 100_000
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_MX_PATTERN = re.compile(r"(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)+[a-z0-9-]{1,63}", re.I)


class PolicyError(ValueError):
    """A policy file that is not RFC 8461's."""


@dataclass(frozen=True, slots=True)
class STSPolicy:
    """A fetched policy with the id of the TXT record it was fetched for and when it
    stops being valid (``expires``, seconds since the epoch)."""

    domain: str
    id: str
    mode: Mode
    mx: tuple[str, ...]
    max_age: int
    fetched_at: float
    expires: float

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["mx"] = list(self.mx)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> STSPolicy:
        mode = str(data["mode"])
        if mode not in _MODES:
            raise ValueError(f"mode {mode!r}")
        return cls(
            domain=str(data["domain"]),
            id=str(data["id"]),
            mode=mode,  # type: ignore[arg-type]  # checked above
            mx=tuple(str(mx) for mx in data["mx"]),
            max_age=int(data["max_age"]),
            fetched_at=float(data["fetched_at"]),
            expires=float(data["expires"]),
        )


def parse_txt(records: list[str]) -> str | None:
    """The policy id of ``_mta-sts`` TXT records; None when there is no (single, valid)
    STSv1 record (RFC 8461 3.1: several are as none)."""
    ids: list[str] = []
    for record in records:
        fields = [part.strip() for part in record.split(";")]
        if not fields or fields[0].replace(" ", "") != "v=STSv1":
            continue
        found = None
        for part in fields[1:]:
            key, sep, value = part.partition("=")
            if sep and key.strip() == "id" and _ID.fullmatch(value.strip()):
                found = value.strip()
        if found is None:
            return None  # an STSv1 record without a valid id: no policy
        ids.append(found)
    return ids[0] if len(ids) == 1 else None


def parse_policy(text: str) -> tuple[Mode, tuple[str, ...], int]:
    """``(mode, mx patterns, max_age)`` of a policy file; raises :class:`PolicyError`."""
    values: dict[str, str] = {}
    mx: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"not a key: value line: {line[:80]!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            if not _MX_PATTERN.fullmatch(value.rstrip(".")):
                raise PolicyError(f"mx {value[:80]!r} is not a host name or *.domain pattern")
            mx.append(value.lower().rstrip("."))
        elif key in ("version", "mode", "max_age") and key not in values:
            values[key] = value  # RFC 8461 3.2: only the first of each counts
    if values.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = values.get("mode", "")
    if mode not in _MODES:
        raise PolicyError(f"mode {mode[:20]!r} is not enforce, testing or none")
    max_age_text = values.get("max_age", "")
    if not max_age_text.isdigit() or len(max_age_text) > 10:
        raise PolicyError("max_age is missing or not a number of seconds")
    max_age = min(int(max_age_text), MAX_AGE_LIMIT)
    if mode != "none" and not mx:
        raise PolicyError("no mx patterns")
    return mode, tuple(dict.fromkeys(mx)), max_age  # type: ignore[return-value]


class _DNSResolver(AbstractResolver):
    """aiohttp's name lookups through mailgate's resolver (``dns_nameservers``)."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            addresses = await self.resolver.addresses(host)
        except DNSTempError as exc:
            raise OSError(f"cannot look up {host}: {exc}") from None
        if not addresses:
            raise OSError(f"{host} has no A or AAAA record")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None


class MTASTS:
    """The MTA-STS policy source of an engine (see the module docstring)."""

    def __init__(
        self,
        resolver: Resolver,
        options: OutboundOptions,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.resolver = resolver
        self.cafile = options.tls_cafile
        self.port = options.mta_sts_port
        self.cache_file = Path(options.mta_sts_cache_file) if options.mta_sts_cache_file else None
        self._clock = clock
        self._policies: dict[str, STSPolicy] = {}
        self._failed: dict[tuple[str, str], float] = {}
        #: The lookup under way per domain: concurrent deliveries share it.
        self._inflight: dict[str, asyncio.Future[STSPolicy | None]] = {}
        self._loaded = self.cache_file is None
        self._http: aiohttp.ClientSession | None = None
        #: Policies fetched over HTTPS (for tests and operators).
        self.fetches = 0

    # --- the provider interface -------------------------------------------------------------

    async def destination_policy(
        self, domain: str, fallback: TLSRequirement
    ) -> DestinationPolicy | None:
        policy = await self.policy(domain)
        if policy is None or policy.mode == "none":
            return None
        reason = f"MTA-STS policy {policy.id} of {policy.domain} ({policy.mode})"
        matcher = CAMatcher(self.cafile, "mta-sts")
        if policy.mode == "enforce":
            requirement = TLSRequirement("verify", "mta-sts", "mta-sts", matcher, reason)
            return DestinationPolicy(requirement, mx_patterns=policy.mx)
        # testing: as before (the configured level's mode), failures logged.
        requirement = TLSRequirement(
            fallback.mode, "mta-sts", "mta-sts", matcher, reason, report_only=True
        )
        return DestinationPolicy(requirement, mx_patterns=policy.mx, enforce_mx=False)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # --- finding the policy -------------------------------------------------------------------

    async def policy(self, domain: str) -> STSPolicy | None:
        """The policy in force for ``domain`` (cached, or fetched now), or None."""
        domain = domain.lower().rstrip(".")
        if not self._loaded:
            await self._load()
        known, policy = self._answer_from_caches(domain)
        if known:
            return policy
        pending = self._inflight.get(domain)
        if pending is None:
            # One lookup (and fetch) per domain at a time; a caller that is cancelled
            # leaves it running for the others (shield).
            pending = asyncio.ensure_future(self._policy(domain))
            self._inflight[domain] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(domain, None))
        return await asyncio.shield(pending)

    def _answer_from_caches(self, domain: str) -> tuple[bool, STSPolicy | None]:
        """``(True, policy)`` when the resolver's cached TXT answer and the policy cache
        decide without a lookup or a fetch (every delivery but the first in a while);
        ``(False, None)`` when :meth:`_policy` must run."""
        records = self.resolver.cached(f"_mta-sts.{domain}", "TXT")
        if records is None:
            return False, None
        cached = self._policies.get(domain)
        if cached is not None and cached.expires <= self._clock():
            return False, None  # :meth:`_policy` drops it
        policy_id = parse_txt(records)
        if policy_id is None or (cached is not None and cached.id == policy_id):
            return True, cached
        return False, None

    async def _policy(self, domain: str) -> STSPolicy | None:
        now = self._clock()
        cached = self._policies.get(domain)
        if cached is not None and cached.expires <= now:
            del self._policies[domain]
            cached = None
        try:
            records = await self.resolver.txt(f"_mta-sts.{domain}")
        except DNSTempError as exc:
            if cached is None:
                log.debug("MTA-STS of %s: TXT lookup failed: %s", domain, exc)
            return cached
        policy_id = parse_txt(records)
        if policy_id is None:
            return cached  # RFC 8461 5.1: a fresh cached policy stays in force
        if cached is not None and cached.id == policy_id:
            return cached
        backoff = self._failed.get((domain, policy_id))
        if backoff is not None and backoff > now:
            return cached
        try:
            mode, mx, max_age = await self._fetch(domain)
        except (ValueError, aiohttp.ClientError, OSError, TimeoutError) as exc:  # PolicyError too
            self._failed[(domain, policy_id)] = now + FAILURE_BACKOFF
            if len(self._failed) > 10_000:
                self._failed.clear()
            log.warning(
                "MTA-STS of %s: cannot fetch policy %s: %s%s",
                domain,
                policy_id,
                _describe(exc),
                "; the cached one stays in force" if cached is not None else "",
            )
            return cached
        fetched = STSPolicy(domain, policy_id, mode, mx, max_age, now, now + max_age)
        if len(self._policies) >= _MAX_POLICIES:
            for name in [n for n, p in self._policies.items() if p.expires <= now]:
                del self._policies[name]
        self._policies[domain] = fetched
        self._failed.pop((domain, policy_id), None)
        log.info(
            "MTA-STS of %s: policy %s, mode %s, mx %s, max_age %d",
            domain,
            policy_id,
            mode,
            ", ".join(mx) or "-",
            max_age,
        )
        await self._save()
        return fetched

    async def _fetch(self, domain: str) -> tuple[Mode, tuple[str, ...], int]:
        self.fetches += 1
        host = f"mta-sts.{domain}"
        authority = host if self.port == 443 else f"{host}:{self.port}"
        url = f"https://{authority}/.well-known/mta-sts.txt"
        session = self._client()
        async with session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise PolicyError(f"{url} answered HTTP {response.status} (200 is required)")
            content_type = response.headers.get("Content-Type", "")
            if content_type.split(";")[0].strip().lower() != "text/plain":
                raise PolicyError(f"{url} is {content_type or 'untyped'}, not text/plain")
            data = await response.content.read(MAX_POLICY_BYTES + 1)
        if len(data) > MAX_POLICY_BYTES:
            raise PolicyError(f"{url} is larger than {MAX_POLICY_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError(f"{url} is not UTF-8 text") from None
        return parse_policy(text)

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            context = ssl.create_default_context(cafile=self.cafile)
            connector = aiohttp.TCPConnector(
                ssl=context, resolver=_DNSResolver(self.resolver), limit=20
            )
            self._http = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT),
                headers={"User-Agent": "mailgate MTA-STS"},
                trust_env=False,  # no proxy: the policy host is reached directly
            )
        return self._http

    # --- the cache on disk --------------------------------------------------------------------

    async def _load(self) -> None:
        self._loaded = True
        path = self.cache_file
        if path is None:
            return
        loop = asyncio.get_running_loop()
        try:
            text = await loop.run_in_executor(None, path.read_text, "utf-8")
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("MTA-STS cache %s: cannot read it: %s", path, exc.strerror or exc)
            return
        now = self._clock()
        try:
            entries = json.loads(text)
            for data in entries.get("policies", []):
                policy = STSPolicy.from_json(data)
                if policy.expires > now:
                    self._policies.setdefault(policy.domain, policy)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("MTA-STS cache %s: not readable (%s); starting afresh", path, exc)

    async def _save(self) -> None:
        path = self.cache_file
        if path is None:
            return
        now = self._clock()
        data = {
            "version": 1,
            "policies": [p.to_json() for p in self._policies.values() if p.expires > now],
        }
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, _write_atomically, path, json.dumps(data, indent=1))
        except OSError as exc:
            log.warning("MTA-STS cache %s: cannot write it: %s", path, exc.strerror or exc)


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a crash leaves the old file or the new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".mta-sts.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        _unlink_quietly(temporary)
        raise


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


__all__ = ["MTASTS", "PolicyError", "STSPolicy", "parse_policy", "parse_txt"]
