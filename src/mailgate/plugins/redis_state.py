"""Policy state in Redis, shared by every node that uses the same server: rate counters
(:class:`RedisCounters`, a :class:`~mailgate.plugins.counters.CounterStore`), greylisting
triplets (:class:`RedisGreylistStore`, a
:class:`~mailgate.plugins.greylist_store.GreylistBackend`) and the honeypot's per-address
counts (:class:`RedisAddressCounts`).

All of them talk through one :class:`RedisState`: redis-py's asyncio client (hiredis
parses replies when installed) with every request bounded by ``timeout`` (connecting
included), no retries of its own, and the outage bookkeeping: the first failure is logged
once, later requests during the outage fail at once for a short back-off (so a Redis
that accepts connections but never answers costs each session ``timeout`` only while it
is being probed), and the first answer afterwards is logged with how long it was gone.
Each failing request raises :class:`~mailgate.plugins.state.StateUnavailable`, which
tells the plugin whether to fail open or closed.

Every read-modify-write is one round trip and atomic: a Lua script (sent with EVALSHA,
loaded again after a Redis restart) or a MULTI transaction. Keys expire on their own
(``PX``/``PEXPIRE``), so nothing has to prune them; every key of a greylisting client
network shares one hash tag, so a script's keys are in one slot.

Times are the nodes' clocks (``time.time``), as with the in-memory store: keep the nodes
in sync with NTP (a node whose clock is off by a second shifts a limit by a second).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .counters import RateResult, _check
from .greylist_store import ClientState, Triplet, TripletState
from .state import StateUnavailable, redacted_url

__all__ = [
    "HONEYPOT_ADDRESS_TTL",
    "RedisAddressCounts",
    "RedisCounters",
    "RedisGreylistStore",
    "RedisState",
]

log = logging.getLogger("mailgate.state")

T = TypeVar("T")

#: Connections to Redis one process opens at most; a request beyond waits (within its
#: timeout) for one to be free.
MAX_CONNECTIONS: Final = 64
#: After a failure, requests fail at once for this long, doubling up to the maximum,
#: before one is let through to probe Redis again.
FIRST_BACKOFF: Final = 0.25
MAX_BACKOFF: Final = 2.0
#: How long Redis keeps a honeypot's counts of an address after its last connection.
HONEYPOT_ADDRESS_TTL: Final = 7 * 86400

_EPSILON_TEXT: Final = "1e-9"

# GCRA, the same arithmetic as MemoryCounters.take (see mailgate.plugins.counters), in one
# script so that check-and-count is atomic across nodes. Floats travel as text ("%.17g"
# round-trips a double exactly); the reply's retry_after too (Redis truncates Lua numbers
# to integers).
_GCRA: Final = """
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local consume = ARGV[5] == '1'
local eps = tonumber(ARGV[6])
local interval = window / limit
local start = now
local stored = redis.call('GET', KEYS[1])
if stored then
  local tat = tonumber(stored)
  if tat and tat > now then start = tat end
end
local function room(tat)
  local left = math.floor((now + window - math.max(tat, now)) / interval + eps)
  if left < 0 then return 0 end
  return left
end
local after = start + cost * interval
local allow_at = after - window
if allow_at > now + eps then
  return {0, room(start), string.format('%.17g', allow_at - now)}
end
if not consume then
  return {1, room(start), '0'}
end
redis.call('SET', KEYS[1], string.format('%.17g', after), 'PX', math.ceil((after - now) * 1000))
return {1, room(after), '0'}
"""

# RedisCounters.hit_all: several counters, all or none. ARGV: now, eps, then limit, window,
# cost for each key. A refused counter refuses the lot and nothing is counted.
_GCRA_ALL: Final = """
local now = tonumber(ARGV[1])
local eps = tonumber(ARGV[2])
local starts, afters, replies = {}, {}, {}
local all = true
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[3 * i])
  local window = tonumber(ARGV[3 * i + 1])
  local cost = tonumber(ARGV[3 * i + 2])
  local interval = window / limit
  local start = now
  local stored = redis.call('GET', key)
  if stored then
    local tat = tonumber(stored)
    if tat and tat > now then start = tat end
  end
  local after = start + cost * interval
  local allow_at = after - window
  starts[i], afters[i] = start, after
  local function room(tat)
    local left = math.floor((now + window - math.max(tat, now)) / interval + eps)
    if left < 0 then return 0 end
    return left
  end
  if allow_at > now + eps then
    all = false
    replies[i] = {0, room(start), string.format('%.17g', allow_at - now)}
  else
    replies[i] = {1, room(start), '0', room(after)}
  end
end
for i, key in ipairs(KEYS) do
  if all then
    local after = afters[i]
    redis.call('SET', key, string.format('%.17g', after), 'PX', math.ceil((after - now) * 1000))
    replies[i] = {1, replies[i][4], '0'}
  elseif replies[i][1] == 1 then
    replies[i] = {1, replies[i][2], '0'}
  end
end
return replies
"""

# GreylistBackend.mark_passed; KEYS: the triplet, its client network; ARGV: now, expiry
# in ms, client_since ('' for none). The same rules as GreylistStore._mark_passed.
_MARK_PASSED: Final = """
local newly = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HEXISTS', KEYS[1], 'passed_at') == 0 then
    newly = 1
    redis.call('HSET', KEYS[1], 'passed_at', ARGV[1], 'last_seen', ARGV[1])
  else
    redis.call('HSET', KEYS[1], 'last_seen', ARGV[1])
  end
else
  redis.call('HSET', KEYS[1], 'first_seen', ARGV[1], 'last_seen', ARGV[1], 'passed_at', ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if newly == 1 and ARGV[3] ~= '' then
  local last = redis.call('HGET', KEYS[2], 'last_seen')
  if last and tonumber(last) >= tonumber(ARGV[3]) then
    redis.call('HINCRBY', KEYS[2], 'passed', 1)
  else
    redis.call('HSET', KEYS[2], 'passed', 1)
  end
  redis.call('HSET', KEYS[2], 'last_seen', ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return newly
"""

# GreylistBackend.touch_client: refresh a client network that exists.
_TOUCH_CLIENT: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'last_seen', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def _float(value: float) -> str:
    return repr(float(value))


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisState:
    """One Redis server as the shared store of a process's policies: the client (made on
    first use, in the event loop that uses it, so also after a ``--workers`` fork), the
    scripts, the time limit of every request and the outage bookkeeping.

    The stores built on it :meth:`acquire` it and :meth:`release` it when closed; the
    client is closed with the last of them."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.25,
        fail_closed: bool = False,
        key_prefix: str = "mailgate:",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.url = url
        self.timeout = float(timeout)
        self.fail_closed = fail_closed
        self.key_prefix = key_prefix
        self._monotonic = monotonic
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._users = 0
        #: When the current outage began (monotonic), None while Redis answers.
        self._down_since: float | None = None
        self._failed_requests = 0
        self._backoff = 0.0
        self._probe_at = 0.0
        #: Outages seen so far (each logged once when it began and once when it ended).
        self.outages = 0

    def __repr__(self) -> str:
        return f"RedisState({redacted_url(self.url)!r})"

    @property
    def where(self) -> str:
        """How logs name this store: ``Redis at redis://host:6379/0`` (no password)."""
        return f"Redis at {redacted_url(self.url)}"

    @property
    def available(self) -> bool:
        """False during an outage (since a request failed, until one succeeds)."""
        return self._down_since is None

    def acquire(self) -> RedisState:
        self._users += 1
        return self

    async def release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            await self.aclose()

    async def aclose(self) -> None:
        client, self._client = self._client, None
        self._scripts.clear()
        if client is not None:
            try:
                await client.aclose()
            except (RedisError, OSError, RuntimeError) as exc:
                log.debug("closing the Redis client: %s", exc)

    def key(self, *parts: str) -> str:
        return self.key_prefix + ":".join(parts)

    def _connect(self) -> redis.Redis:
        if self._client is None:
            # Connecting and each reply are bounded by the socket timeouts, every request as
            # a whole by asyncio.timeout in run(); no retries: a request that failed is
            # answered by the policy at once, the next one tries again.
            pool = redis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=MAX_CONNECTIONS,
                timeout=self.timeout,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0),
            )
            self._client = redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        return self._client

    def script(self, name: str, source: str) -> Any:
        """The registered script (EVALSHA, loaded again when Redis answers NOSCRIPT)."""
        found = self._scripts.get(name)
        if found is None:
            found = self._scripts[name] = self._connect().register_script(source)
        return found

    async def run(self, what: str, request: Callable[[redis.Redis], Awaitable[T]]) -> T:
        """``request(client)`` within the timeout; StateUnavailable when Redis fails, does
        not answer in time, or is in its back-off after a failure."""
        now = self._monotonic()
        if self._down_since is not None and now < self._probe_at:
            self._failed_requests += 1
            raise StateUnavailable(
                f"Redis unavailable for {now - self._down_since:.1f} s",
                fail_closed=self.fail_closed,
            )
        try:
            client = self._connect()
            async with asyncio.timeout(self.timeout):
                result = await request(client)
        except (RedisError, OSError, TimeoutError) as exc:
            problem = f"no answer within {self.timeout:g} s" if _is_timeout(exc) else str(exc)
            self._failed(what, problem or type(exc).__name__)
            raise StateUnavailable(
                f"Redis {what} failed: {problem}", fail_closed=self.fail_closed
            ) from None
        if self._down_since is not None:
            self._recovered()
        return result

    def _failed(self, what: str, problem: str) -> None:
        now = self._monotonic()
        self._failed_requests += 1
        if self._down_since is None:
            self._down_since = now
            self._backoff = FIRST_BACKOFF
            self.outages += 1
            log.warning(
                "shared state: Redis at %s failed (%s: %s); policies fail %s until it "
                "answers again",
                redacted_url(self.url),
                what,
                problem,
                "closed (4xx)" if self.fail_closed else "open",
                extra={"redis": redacted_url(self.url), "problem": problem},
            )
        else:
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)
        self._probe_at = now + self._backoff

    def _recovered(self) -> None:
        assert self._down_since is not None
        gone = self._monotonic() - self._down_since
        log.warning(
            "shared state: Redis at %s answers again after %.1f s (%d requests failed meanwhile)",
            redacted_url(self.url),
            gone,
            self._failed_requests,
            extra={"redis": redacted_url(self.url), "outage_seconds": round(gone, 3)},
        )
        self._down_since = None
        self._failed_requests = 0
        self._backoff = 0.0


def _is_timeout(exc: BaseException) -> bool:
    from redis.exceptions import TimeoutError as RedisTimeout

    return isinstance(exc, TimeoutError | RedisTimeout)


class RedisCounters:
    """A :class:`~mailgate.plugins.counters.CounterStore` in Redis: one key per counter
    (``<prefix>rate:<key>``) holding its GCRA time, expiring when the bucket is full
    again. ``clock`` gives the time (the nodes' ``time.time``; tests inject theirs)."""

    def __init__(self, state: RedisState, *, clock: Callable[[], float] = time.time) -> None:
        self.state = state.acquire()
        self.clock = clock
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisCounters({self.state!r})"

    async def hit(self, key: str, limit: int, window: float, cost: int = 1) -> RateResult:
        return await self._gcra(key, limit, window, cost, consume=True)

    async def peek(self, key: str, limit: int, window: float, cost: int = 1) -> RateResult:
        return await self._gcra(key, limit, window, cost, consume=False)

    async def hit_all(self, hits: Sequence[tuple[str, int, float]]) -> list[RateResult]:
        """Count one hit (cost 1) against each ``(key, limit, window)``, all or none, in
        one round trip: when one has no room, nothing is counted and the results say
        which (the others answer as :meth:`peek` would)."""
        for _, limit, window in hits:
            _check(limit, window, 1)
        script = self.state.script("gcra_all", _GCRA_ALL)
        keys = [self.state.key("rate", key) for key, _, _ in hits]
        args = [_float(self.clock()), _EPSILON_TEXT]
        for _, limit, window in hits:
            args += [str(limit), _float(window), "1"]
        replies = await self.state.run(
            "rate limit", lambda client: script(keys=keys, args=args, client=client)
        )
        return [
            RateResult(bool(allowed), int(remaining), float(retry_after))
            for allowed, remaining, retry_after in replies
        ]

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self.state.release()

    async def _gcra(
        self, key: str, limit: int, window: float, cost: int, *, consume: bool
    ) -> RateResult:
        _check(limit, window, cost)
        script = self.state.script("gcra", _GCRA)
        args = [
            _float(self.clock()),
            str(limit),
            _float(window),
            str(cost),
            "1" if consume else "0",
            _EPSILON_TEXT,
        ]
        full_key = self.state.key("rate", key)
        reply = await self.state.run(
            "rate limit", lambda client: script(keys=[full_key], args=args, client=client)
        )
        allowed, remaining, retry_after = reply
        return RateResult(bool(allowed), int(remaining), float(retry_after))


def _field(value: bytes | str | None) -> float | None:
    return None if value is None else float(value)


class RedisGreylistStore:
    """A :class:`~mailgate.plugins.greylist_store.GreylistBackend` in Redis. A triplet is
    a hash (``first_seen``, ``last_seen``, ``passed_at``) expiring ``retry_window`` after
    its first attempt until it passes, then ``expiry`` after its last mail; a client
    network's passed count is a hash expiring ``expiry`` after it was last seen. So
    :meth:`prune` has nothing to do. ``retry_window`` and ``expiry`` must be the
    plugin's (:meth:`Greylist.from_section` builds the store with them)."""

    def __init__(self, state: RedisState, *, retry_window: float, expiry: float) -> None:
        if not retry_window > 0 or not expiry > 0:
            raise ValueError("retry_window and expiry must be positive")
        self.state = state.acquire()
        self.retry_window = float(retry_window)
        self.expiry = float(expiry)
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisGreylistStore({self.state!r})"

    def _keys(self, client: str) -> tuple[str, str]:
        # The client network is the hash tag: a script's two keys are in one slot.
        base = self.state.key("grey", "{" + client + "}")
        return base + ":t:", base + ":c"

    def _triplet_key(self, triplet: Triplet) -> str:
        prefix, _ = self._keys(triplet.client)
        return f"{prefix}{triplet.sender}\x00{triplet.recipient}"

    async def lookup(self, triplet: Triplet) -> TripletState | None:
        key = self._triplet_key(triplet)
        first, last, passed = await self.state.run(
            "greylisting lookup",
            lambda client: client.hmget(key, ["first_seen", "last_seen", "passed_at"]),
        )
        if first is None or last is None:
            return None
        return TripletState(float(first), float(last), _field(passed))

    async def record(self, triplet: Triplet, now: float) -> None:
        key = self._triplet_key(triplet)
        seen = _float(now)

        async def request(client: redis.Redis) -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping={"first_seen": seen, "last_seen": seen})
                pipe.pexpire(key, _ms(self.retry_window))
                await pipe.execute()

        await self.state.run("greylisting record", request)

    async def mark_passed(
        self, triplet: Triplet, now: float, *, client_since: float | None = None
    ) -> bool:
        _, client_key = self._keys(triplet.client)
        keys = [self._triplet_key(triplet), client_key]
        args = [
            _float(now),
            str(_ms(self.expiry)),
            "" if client_since is None else _float(client_since),
        ]
        script = self.state.script("greylist_passed", _MARK_PASSED)
        newly = await self.state.run(
            "greylisting pass", lambda client: script(keys=keys, args=args, client=client)
        )
        return bool(newly)

    async def lookup_client(self, client: str) -> ClientState | None:
        _, key = self._keys(client)
        passed, last = await self.state.run(
            "greylisting client lookup",
            lambda redis_client: redis_client.hmget(key, ["passed", "last_seen"]),
        )
        if passed is None or last is None:
            return None
        return ClientState(int(passed), float(last))

    async def touch_client(self, client: str, now: float) -> None:
        _, key = self._keys(client)
        script = self.state.script("greylist_touch", _TOUCH_CLIENT)
        args = [_float(now), str(_ms(self.expiry))]
        await self.state.run(
            "greylisting client refresh",
            lambda redis_client: script(keys=[key], args=args, client=redis_client),
        )

    async def prune(self, now: float, *, retry_window: float, expiry: float) -> int:
        """Nothing to do: Redis drops expired keys itself."""
        return 0

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self.state.release()


class RedisAddressCounts:
    """The honeypot's per-address counts (connections, AUTH attempts) in Redis: one hash
    per address (``<prefix>honeypot:addr:<ip>``), kept ``ttl`` seconds after it last
    changed. :meth:`bump` counts one more and answers the new total over every node."""

    def __init__(self, state: RedisState, *, ttl: int = HONEYPOT_ADDRESS_TTL) -> None:
        self.state = state.acquire()
        self.ttl = ttl
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisAddressCounts({self.state!r})"

    async def bump(self, ip: str, counter: str) -> int:
        key = self.state.key("honeypot", "addr", ip)

        async def request(client: redis.Redis) -> int:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hincrby(key, counter, 1)
                pipe.expire(key, self.ttl)
                total, _ = await pipe.execute()
            return int(total)

        return await self.state.run("honeypot count", request)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self.state.release()
