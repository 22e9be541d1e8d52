"""The outbound delivery engine: one message to one destination, an answer per recipient.

``await engine.deliver(request)`` waits for a slot of the destination's concurrency,
finds the hosts (MX lookup for a relay, the smarthost of a forward), takes a cached
session or opens one, walking the hosts and their addresses in order until one gives a
session (next on a connection failure, a 4xx or 5xx greeting or EHLO, a TLS failure),
sends the message to every recipient (one transaction per 50 of them) and returns what
became of each. Nothing raises out of it but cancellation: remote trouble, DNS trouble
and even a bug of its own end as per-recipient results. One log line per attempt on the
``mailgate.queue.outbound`` logger, with the fields also under ``record.outbound``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from mailgate.dns import Resolver
from mailgate.smtpclient import MessageFile

from .cache import SessionCache
from .destinations import Admission, DestinationState
from .model import (
    DeliveryRequest,
    DeliveryResult,
    Destination,
    Forward,
    Outcome,
    PolicyInfo,
    RecipientResult,
    Relay,
    RemoteMTA,
    TLSInfo,
    tls_summary,
)
from .mx import RouteFailure, host_addresses, mail_hosts
from .options import OutboundOptions
from .session import Answer, Endpoint, HostFailure, Session, open_session
from .tlspolicy import (
    DANEProvider,
    DestinationPolicy,
    MTASTSProvider,
    PolicyResolver,
    PolicySource,
    TLSLevel,
    TLSRequirement,
    base_requirement,
    warn_once,
)

if TYPE_CHECKING:
    from mailgate.dns.dnssec import DNSSECResolver

log = logging.getLogger("mailgate.queue.outbound")

_STATE_SWEEP_INTERVAL = 60.0
_STATE_IDLE_LIFETIME = 600.0
_INTERNAL_ERROR = Answer(
    Outcome.DEFERRED, "4.3.0", "internal error in mailgate's outbound delivery (see its log)"
)
_STARTTLS_MODES: dict[str, TLSLevel] = {"no": "none", "auto": "may", "require": "encrypt"}


@dataclass(frozen=True, slots=True)
class DestinationStatus:
    """What the engine knows of a destination right now (for operators and tests)."""

    concurrency_limit: int
    active: int
    consecutive_failures: int
    suspended: bool
    idle_sessions: int


@dataclass(frozen=True, slots=True)
class _NoEndpoints:
    """No host to try: DNS said so, or the TLS policy (MTA-STS) ruled every MX host
    out. ``counts`` says whether it tells of the destination's health (neither does)."""

    outcome: Outcome
    status: str
    diagnostic: str
    counts: bool
    policy: PolicyInfo | None = None


@dataclass(slots=True)
class _Attempt:
    answers: list[Answer]
    session: Session | None = None
    reused: bool = False
    #: Whether a session was had (feeds slow start and the dead-destination tracker).
    connected: bool = False
    counts: bool = True  # False: the outcome says nothing of the destination (DNS, local)
    #: The TLS policy of the session, or of the last host tried.
    policy: PolicyInfo | None = None


class OutboundEngine:
    """Deliver :class:`DeliveryRequest` s; see the module docstring.

    ``resolver`` is mailgate's resolver (so ``dns_nameservers`` applies); without one, a
    resolver of the system's name servers is made. Use one engine per event loop and
    :meth:`aclose` it (or ``async with``) to close its cached sessions.

    ``mta_sts``: the MTA-STS policy source (default: :class:`~.mtasts.MTASTS` over
    ``resolver`` and HTTPS); ``dane``: what the ``dane`` level asks (None: ``dane`` is
    ``may``, with a log line).
    """

    def __init__(
        self,
        options: OutboundOptions | None = None,
        *,
        resolver: Resolver | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        mta_sts: MTASTSProvider | None = None,
        dane: DANEProvider | None = None,
    ) -> None:
        self.options = options or OutboundOptions()
        self.resolver = resolver if resolver is not None else Resolver()
        options = self.options
        if mta_sts is None:
            from .mtasts import MTASTS

            mta_sts = MTASTS(self.resolver, options)
        self.mta_sts = mta_sts
        #: DNSSEC answers (DANE, and REQUIRETLS's secure-MX rule); None: ``dnssec`` off.
        self.dnssec: DNSSECResolver | None = getattr(dane, "dnssec", None)
        if dane is None and options.dnssec != "off":
            from mailgate.dns.dnssec import DNSSECResolver

            from .dane import DANE

            self.dnssec = DNSSECResolver(
                self.resolver.nameservers,
                mode=options.dnssec,
                trust_anchors=options.dnssec_trust_anchors,
                timeout=self.resolver.timeout,
            )
            dane = DANE(self.dnssec)
        self.dane = dane
        self.policies = PolicyResolver(
            default=options.tls_policy,
            domains=dict(options.tls_policies),
            cafile=options.tls_cafile,
            mta_sts=mta_sts,
            mta_sts_default=options.mta_sts,
            dane=dane,
        )
        self._rng = rng or random.Random()
        self._clock = clock
        self._cache = SessionCache(self.options)
        self._states: dict[str, DestinationState] = {}
        self._plaintext_until: dict[tuple[str, int], float] = {}
        self._last_sweep = clock()
        self.sessions_opened = 0

    async def __aenter__(self) -> OutboundEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the cached sessions (QUIT, bounded by a few seconds each)."""
        await self._cache.aclose()
        closer = getattr(self.mta_sts, "aclose", None)
        if closer is not None:
            await closer()

    # --- state ------------------------------------------------------------------------------

    def status(self, destination: Destination) -> DestinationStatus:
        options = self.options
        state = self._states.get(destination.key)
        idle = self._cache.idle_count(_session_key(destination))
        if state is None:
            return DestinationStatus(options.initial_concurrency, 0, 0, False, idle)
        return DestinationStatus(state.limit, state.active, state.failures, state.suspended, idle)

    def is_suspended(self, destination: Destination) -> bool:
        """True while the destination is dead (deliveries are deferred without trying):
        a queue may hold its messages back until the next probe is due."""
        state = self._states.get(destination.key)
        return state is not None and state.suspended

    def _state(self, key: str) -> DestinationState:
        now = self._clock()
        if now - self._last_sweep > _STATE_SWEEP_INTERVAL:
            self._last_sweep = now
            for old_key in [
                k
                for k, s in self._states.items()
                if s.idle and now - s.last_used > _STATE_IDLE_LIFETIME
            ]:
                del self._states[old_key]
            for host, until in list(self._plaintext_until.items()):
                if until <= now:
                    del self._plaintext_until[host]
        state = self._states.get(key)
        if state is None:
            options = self.options
            state = self._states[key] = DestinationState(
                initial=options.initial_concurrency,
                maximum=options.max_concurrency_per_destination,
                dead_after=options.dead_after_failures,
                probe_interval=options.dead_probe_interval,
                clock=self._clock,
            )
        return state

    # --- delivering ---------------------------------------------------------------------------

    async def deliver(self, request: DeliveryRequest) -> DeliveryResult:
        """Deliver ``request``; one result per recipient, in order."""
        started = self._clock()
        state = self._state(request.destination.key)
        admission = state.admit()
        if admission is Admission.SUSPENDED:
            return self._finish(request, self._suspended(state), started)
        try:
            await state.acquire()
            try:
                if state.suspended and admission is not Admission.PROBE:
                    # It died while this one waited for its turn.
                    return self._finish(request, self._suspended(state), started)
                try:
                    attempt = await self._attempt(request, _session_key(request.destination))
                except Exception:
                    # A bug here must not stop the caller's worker, nor lose the message:
                    # it is deferred and the traceback logged.
                    log.exception("%s: outbound delivery failed unexpectedly", request.queue_id)
                    attempt = _Attempt([_INTERNAL_ERROR], counts=False)
            finally:
                state.release()
        finally:
            if admission is Admission.PROBE:
                state.end_probe()
        if attempt.counts:
            failure = None
            if not attempt.connected:
                failure = (attempt.answers[0].status, attempt.answers[0].diagnostic)
            state.record(session=attempt.connected, failure=failure)
        return self._finish(request, attempt, started)

    def _suspended(self, state: DestinationState) -> _Attempt:
        status, reason = state.last_failure or ("4.4.1", "no session could be had")
        wait = max(0.0, state.next_probe - self._clock())
        answer = Answer(
            Outcome.DEFERRED,
            status if status.startswith("4.") else "4.4.1",
            f"destination suspended after {state.failures} failed attempts in a row "
            f"(next probe in {wait:.0f}s); last: {reason}",
        )
        return _Attempt([answer], counts=False)

    async def _attempt(self, request: DeliveryRequest, key: str) -> _Attempt:
        n = len(request.recipients)
        loop = asyncio.get_running_loop()
        try:
            if request.body is not None:
                body = MessageFile.from_bytes(request.body)
            else:
                # Opened with its first block read (all of a small message): one trip.
                body = await loop.run_in_executor(None, MessageFile.open, request.body_path)
        except OSError as exc:
            answer = Answer(
                Outcome.DEFERRED, "4.3.0", f"cannot read the message: {exc.strerror or exc}"
            )
            return _Attempt([answer] * n, counts=False)
        try:
            return await self._with_session(request, key, body)
        finally:
            body.close()  # read-only: nothing to flush, closing does not block

    async def _with_session(
        self, request: DeliveryRequest, key: str, body: MessageFile
    ) -> _Attempt:
        n = len(request.recipients)
        # The hosts and their TLS requirements first, also for a cached session: a
        # policy that changed (an MTA-STS policy now in force) must not ride on a
        # session opened under the old one. The resolver caches the lookups.
        endpoints = await self._endpoints(request.destination, optional=request.tls_optional)
        if not isinstance(endpoints, _NoEndpoints) and request.require_tls:
            endpoints = await self._requiretls_endpoints(request.destination, endpoints)
        if isinstance(endpoints, _NoEndpoints):
            answer = Answer(endpoints.outcome, endpoints.status, endpoints.diagnostic)
            return _Attempt([answer] * n, counts=endpoints.counts, policy=endpoints.policy)
        session = await self._cached(key, endpoints)
        if session is not None and request.require_tls and _requiretls_problem(session):
            await session.quit()  # opened for mail without REQUIRETLS: not good enough
            session = None
        reused = session is not None
        failures: list[HostFailure] = []
        if session is None:
            session = await self._open_any(endpoints, failures, require_tls=request.require_tls)
        if session is None:
            policy = endpoints[-1].policy if endpoints else None
            # A host that cannot take REQUIRETLS mail is alive all the same: that must not
            # slow down or suspend the destination for its other mail.
            counts = not any(f.answer.status == "5.7.30" for f in failures)
            return _Attempt([_final_failure(failures)] * n, policy=policy, counts=counts)
        keep = False
        try:
            answers, unanswered = await self._transactions(session, request, body)
            if reused and unanswered:
                # A cached session the server had closed meanwhile, found out by the
                # first transaction before any reply (no RSET checked it first): the
                # server took nothing, so the message goes on a new session.
                session.abort()
                reused = False
                fresh = await self._open_any(endpoints, failures, require_tls=request.require_tls)
                if fresh is not None:
                    session = fresh
                    await asyncio.get_running_loop().run_in_executor(None, body.rewind)
                    answers, _ = await self._transactions(session, request, body)
            keep = session.usable
        finally:
            if keep:
                self._cache.put(key, session)
            else:
                session.abort()
        return _Attempt(
            answers,
            session=session,
            reused=reused,
            connected=True,
            policy=session.endpoint.policy,
        )

    async def _transactions(
        self, session: Session, request: DeliveryRequest, body: MessageFile
    ) -> tuple[list[Answer], bool]:
        """One transaction per ``max_recipients_per_transaction`` recipients, one after
        the other on ``session`` (RSET unless the last ended cleanly, and the message
        from its start between them). Also whether the first one lost the session
        before any reply."""
        limit = self.options.max_recipients_per_transaction
        recipients = request.recipients
        if len(recipients) <= limit:
            answers = await session.transact(request, body)
            return answers, session.unanswered
        loop = asyncio.get_running_loop()
        answers = []
        unanswered = False
        for start in range(0, len(recipients), limit):
            if start:
                if not (session.clean and session.usable) and not await session.reset():
                    lost = Answer(
                        Outcome.DEFERRED,
                        "4.4.2",
                        f"lost connection with {session.where} before the transaction for "
                        f"recipients {start + 1} to {len(recipients)}",
                    )
                    answers += [lost] * (len(recipients) - start)
                    break
                await loop.run_in_executor(None, body.rewind)
            part = recipients[start : start + limit]
            answers += await session.transact(replace(request, recipients=part), body)
            if not start:
                unanswered = session.unanswered
        return answers, unanswered

    async def _cached(self, key: str, endpoints: list[Endpoint]) -> Session | None:
        """A cached session for the destination that survives RSET, opened with one of
        ``endpoints`` under the same TLS requirement (others are closed)."""
        wanted = {(e.host, e.address, e.port, e.tls) for e in endpoints}
        for _ in range(self.options.max_concurrency_per_destination + 1):
            session = self._cache.take(key)
            if session is None:
                return None
            endpoint = session.endpoint
            if (endpoint.host, endpoint.address, endpoint.port, endpoint.tls) not in wanted:
                self._cache.discard(session)
                continue
            # A session whose last transaction ended cleanly needs no RSET (a round
            # trip per message); one the server closed meanwhile is caught by the
            # caller (see _with_session).
            if session.clean or await session.reset():
                self._cache.reused += 1
                return session
        return None

    async def _open_any(
        self, endpoints: list[Endpoint], failures: list[HostFailure], *, require_tls: bool = False
    ) -> Session | None:
        """Try the endpoints in order; the first session, or None (``failures`` says why).
        ``require_tls`` (RFC 8689 4.2.1): a host whose TLS or certificate falls short, or
        that does not offer REQUIRETLS, is a permanent failure (5.7.30), and the next is
        tried; when none does better, the message bounces."""
        for endpoint in endpoints[: self.options.mx_address_limit]:
            host = (endpoint.address, endpoint.port)
            plaintext = self._plaintext_until.get(host, 0.0) > self._clock()
            try:
                session = await open_session(endpoint, self.options, plaintext=plaintext)
            except HostFailure as failure:
                if require_tls and failure.answer.status in _TLS_FAILURES:
                    failure = HostFailure(
                        Outcome.FAILED,
                        "5.7.30",
                        f"REQUIRETLS: {failure.answer.diagnostic}",
                        failure.answer.reply,
                    )
                failures.append(failure)
                if not (failure.starttls_failed and endpoint.tls.mode == "may"):
                    continue
                # Opportunistic TLS that failed: remember the host, and try it again now
                # in plain text, as Postfix does.
                self._plaintext_until[host] = self._clock() + self.options.tls_fallback_time
                try:
                    session = await open_session(endpoint, self.options, plaintext=True)
                except HostFailure as again:
                    failures.append(again)
                    continue
            self.sessions_opened += 1
            self._cache.opened += 1
            problem = _requiretls_problem(session) if require_tls else None
            if problem is not None:
                await session.quit()
                failures.append(HostFailure(Outcome.FAILED, "5.7.30", problem))
                continue
            return session
        return None

    async def _requiretls_endpoints(
        self, destination: Destination, endpoints: list[Endpoint]
    ) -> list[Endpoint] | _NoEndpoints:
        """The endpoints of a REQUIRETLS message (RFC 8689 4.2.1): every one must verify
        the server's certificate. DANE and MTA-STS requirements already do; any other
        becomes ``verify`` against the CAs, which for MX hosts is enough only when the
        MX records are DNSSEC-secure (an attacker could otherwise name its own host, with
        a good certificate for its own name)."""
        mx_secure: bool | None = None
        why = ""
        upgraded: list[Endpoint] = []
        for endpoint in endpoints:
            requirement = endpoint.tls
            if requirement.verification_required and requirement.source in ("dane", "mta-sts"):
                upgraded.append(endpoint)
                continue
            if isinstance(destination, Relay) and mx_secure is None:
                mx_secure, why = await self._mx_secure(destination.domain)
            if isinstance(destination, Relay) and not mx_secure:
                continue
            reason = "; ".join(filter(None, (requirement.reason, "REQUIRETLS")))
            upgraded.append(
                replace(endpoint, tls=replace(requirement, mode="verify", reason=reason))
            )
        if upgraded:
            return upgraded
        return _NoEndpoints(
            Outcome.FAILED,
            "5.7.30",
            f"REQUIRETLS: no MX host of {getattr(destination, 'domain', '')} can be "
            f"authenticated: {why} and no DANE or MTA-STS policy applies",
            counts=False,
        )

    async def _mx_secure(self, domain: str) -> tuple[bool, str]:
        """Whether ``domain``'s MX records are DNSSEC-secure (False when DNSSEC is off)."""
        if self.dnssec is None:
            return False, "DNSSEC is off (outbound dnssec), so the MX records are not validated"
        from mailgate.dns.dnssec import Security

        from .dane import mx_security

        security, why = await mx_security(self.dnssec, domain.strip().rstrip("."))
        return security is Security.SECURE, why

    async def _endpoints(
        self, destination: Destination, *, optional: bool = False
    ) -> list[Endpoint] | _NoEndpoints:
        """The addresses to try, in order, each with its TLS requirement. ``optional``
        (``TLS-Required: No``, RFC 8689 5): the recipient domain's DANE and MTA-STS
        policies are not applied; ``may`` instead."""
        options = self.options
        policies = self.policies
        if isinstance(destination, Relay):
            domain = destination.domain.strip().rstrip(".")
            hosts = await mail_hosts(self.resolver, domain, rng=self._rng)
            if isinstance(hosts, RouteFailure):
                return _NoEndpoints(hosts.outcome, hosts.status, hosts.diagnostic, counts=False)
            level, source = policies.level_for(domain, destination.tls)
            if optional:
                policy = DestinationPolicy(_relaxed(level, source, options.tls_cafile))
            else:
                policy = await policies.relay_policy(
                    domain, [host.name for host in hosts], options.port, level, source
                )
            endpoints: list[Endpoint] = []
            refused: list[str] = []
            for host in hosts:
                requirement = policy.for_host(host.name)
                if requirement is None:
                    refused.append(host.name)
                    continue
                endpoints += [
                    Endpoint(
                        host=host.name,
                        address=address,
                        port=options.port,
                        tls=requirement,
                        relay=True,
                    )
                    for address in host.addresses
                ]
            if refused:
                warn_once(
                    f"refused:{domain}:{policy.default.reason}",
                    "%s: MX hosts %s are not in %s; not used",
                    domain,
                    ", ".join(refused),
                    policy.default.reason or "the TLS policy",
                )
            if not endpoints:
                default = policy.default
                return _NoEndpoints(
                    Outcome.DEFERRED,
                    "4.7.5",
                    f"no MX host of {domain} ({', '.join(refused)}) is allowed by "
                    f"{default.reason or 'its TLS policy'}",
                    counts=False,
                    policy=PolicyInfo(default.level, default.mode, default.source, default.reason),
                )
            return endpoints
        assert isinstance(destination, Forward)
        target = destination.target()
        addresses = await host_addresses(self.resolver, target.host)
        if isinstance(addresses, RouteFailure):
            return _NoEndpoints(
                addresses.outcome, addresses.status, addresses.diagnostic, counts=False
            )
        url_level: TLSLevel
        url_source: PolicySource
        if target.tls is not None:  # the URL's own choice wins for this host
            url_level, url_source = target.tls, "url"  # type: ignore[assignment]  # a level
        elif "starttls=" in destination.url:
            url_level, url_source = _STARTTLS_MODES[target.starttls], "url"
        else:
            url_level, url_source = policies.level_for(None, None)
        if target.scheme == "smtps" and url_level in ("none", "may"):
            url_level = "encrypt"  # TLS from the first byte: never plain text
        cafile = target.cafile or options.tls_cafile
        if optional and url_level in _RECIPIENT_POLICIES:
            requirement = _relaxed(url_level, url_source, cafile)
        else:
            requirement = await policies.host_requirement(
                target.host, target.port, url_level, url_source, cafile
            )
        return [
            Endpoint(
                host=target.host,
                address=address,
                port=target.port,
                lmtp=target.scheme == "lmtp",
                implicit_tls=target.scheme == "smtps",
                tls=requirement,
                username=target.username,
                password=target.password,
            )
            for address in addresses
        ]

    # --- the result and its log line ----------------------------------------------------------

    def _finish(
        self, request: DeliveryRequest, attempt: _Attempt, started: float
    ) -> DeliveryResult:
        answers = attempt.answers
        if len(answers) == 1 and len(request.recipients) > 1:
            answers = answers * len(request.recipients)
        session = attempt.session
        remote: RemoteMTA | None = session.remote if session is not None else None
        tls: TLSInfo | None = session.tls if session is not None else None
        results = tuple(
            RecipientResult(
                recipient=recipient,
                outcome=answer.outcome,
                status=answer.status,
                diagnostic=answer.diagnostic,
                reply=answer.reply,
                remote=remote,
                tls=tls,
                tls_policy=attempt.policy,
            )
            for recipient, answer in zip(request.recipients, answers, strict=True)
        )
        result = DeliveryResult(
            request=request,
            recipients=results,
            remote=remote,
            tls=tls,
            delay=max(0.0, self._clock() - started),
            reused=attempt.reused,
            tls_policy=attempt.policy,
        )
        _log_attempt(result)
        return result


#: Levels that are the recipient domain's policies, which ``TLS-Required: No`` sets aside.
_RECIPIENT_POLICIES = ("dane", "dane-only", "mta-sts")
#: Host failures of TLS (no STARTTLS, a handshake or certificate that falls short).
_TLS_FAILURES = ("4.7.4", "4.7.5")


def _relaxed(level: TLSLevel, source: PolicySource, cafile: str | None) -> TLSRequirement:
    """The requirement for a ``TLS-Required: No`` message: the operator's own none, may,
    encrypt or verify stand; DANE and MTA-STS become ``may`` (RFC 8689 5)."""
    if level in _RECIPIENT_POLICIES or level == "may":
        return base_requirement("may", source, cafile, "TLS-Required: No")
    return base_requirement(level, source, cafile)


def _requiretls_problem(session: Session) -> str | None:
    """Why ``session`` cannot carry a REQUIRETLS message, or None (RFC 8689 4.2.1:
    verified TLS, and REQUIRETLS offered in the EHLO after it)."""
    tls = session.tls
    if tls is None:
        return f"REQUIRETLS: no TLS with host {session.where}"
    if not tls.verified:
        return f"REQUIRETLS: the certificate of host {session.where} is not verified: {tls.detail}"
    if not session.smtp.supports_extension("requiretls"):
        return f"REQUIRETLS is required, but was not offered by host {session.where}"
    return None


def _session_key(destination: Destination) -> str:
    """What a cached session must match: the destination and, for a smarthost, the
    credentials it authenticated with (a changed password must not reuse the old
    login). ``hash`` is salted per process, so nothing of the password leaves it."""
    if isinstance(destination, Forward):
        target = destination.target()
        return f"{destination.key}#{hash((target.username, target.password))}"
    return destination.key


def _final_failure(failures: list[HostFailure]) -> Answer:
    """Why no host gave a session: permanent only when every host refused permanently
    (5xx greeting or EHLO); otherwise the last temporary reason."""
    if not failures:
        return Answer(Outcome.DEFERRED, "4.4.1", "no host to connect to")
    temporary = [f.answer for f in failures if f.answer.outcome is not Outcome.FAILED]
    return temporary[-1] if temporary else failures[-1].answer


def _log_attempt(result: DeliveryResult) -> None:
    request = result.request
    tls = result.tls
    policy = result.tls_policy
    record: dict[str, Any] = {
        "queue_id": request.queue_id,
        "attempt": request.attempt,
        "destination": request.destination.key,
        "remote_host": result.remote.host if result.remote else None,
        "remote_ip": result.remote.address if result.remote else None,
        "remote_port": result.remote.port if result.remote else None,
        "tls_version": tls.version if tls else None,
        "tls_cipher": tls.cipher if tls else None,
        "tls_verified": tls.verified if tls else None,
        "tls_verification": tls.method if tls else None,
        "tls_verify_detail": tls.detail if tls and not tls.verified else None,
        "tls_policy": policy.level if policy else None,
        "tls_policy_mode": policy.mode if policy else None,
        "tls_policy_source": policy.source if policy else None,
        "tls_policy_reason": policy.reason or None if policy else None,
        "reused": result.reused,
        "delay": round(result.delay, 3),
        "recipients": [
            {
                "address": r.recipient.address,
                "outcome": r.outcome.value,
                "status": r.status,
                "reply": str(r.reply) if r.reply else None,
                "diagnostic": r.diagnostic,
            }
            for r in result.recipients
        ],
    }
    remote = str(result.remote) if result.remote else "none"
    # tls=-: no session; tls=none: plain text; policy= what applied (and its source).
    tls_text = tls_summary(tls, None) if result.remote is not None else "-"
    policy_text = (
        tls_summary(None, policy, session=False).removeprefix("policy=") if policy else "-"
    )
    outcomes = "; ".join(
        f"<{r.recipient.address}> {r.outcome.value} {r.status} {r.diagnostic}"
        for r in result.recipients
    )
    worst = max((r.outcome for r in result.recipients), key=_severity)
    level = logging.INFO if worst is Outcome.DELIVERED else logging.WARNING
    log.log(
        level,
        "%s: attempt=%d destination=%s remote=%s tls=%s policy=%s reused=%s delay=%.3fs: %s",
        request.queue_id,
        request.attempt,
        request.destination.key,
        remote,
        tls_text,
        policy_text,
        "yes" if result.reused else "no",
        result.delay,
        outcomes,
        extra={"outbound": record},
    )


def _severity(outcome: Outcome) -> int:
    return {Outcome.DELIVERED: 0, Outcome.DEFERRED: 1, Outcome.FAILED: 2}[outcome]
