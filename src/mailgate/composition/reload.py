"""SIGHUP for the built-in policy chain: build it again from the new settings, swap it in.

The new chain is built whole before anything changes (every table read and checked,
every list file read): a configuration that fails to build leaves the old chain, and the
old settings, running. Once built it replaces the old policy plugins in the hooks
registry in one step (:meth:`mailgate.hooks.Hooks.replace`); plugins registered in code
keep their places.

What a session in progress sees: each stage runs the chain current when the stage
starts. A stage already running (a DNS list lookup, say) finishes with the old plugins;
the session's next command runs the new ones. The plugins keep what they note about a
session on the session itself, so the new ones read it where the old ones left it.

Two things are carried over rather than rebuilt:

- the routing plugin: the queue, built at start, delivers by its rules, so ``[[routes]]``,
  ``[queue]`` and ``[outbound]`` change only on restart (a change is logged as a warning);
- the rate limits' in-memory counts: a reload does not give every client a fresh allowance.

The queue itself stays too, but its DKIM and ARC keys (``[[dkim_sign]]``, ``[arc_seal]``)
are read again from the new settings (``Server.reload``): a rotated key takes effect.

The old plugins are closed (their stores and resolvers) once every connection that was
open at the swap has ended, or at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence, Set
from typing import Any

from mailgate.hooks import HookError, Hooks
from mailgate.server.options import ServerOptions

from .builtins import policy_plugins, routing_plugin

__all__ = ["PolicyReload", "ReloadError", "build_policy_chain"]

log = logging.getLogger("mailgate.server")

#: The tables the queue built at start depends on (see the module docstring).
RESTART_TABLES = ("routes", "queue", "outbound")


class ReloadError(Exception):
    """The new configuration's policy chain could not be built; the message says why."""


def _tables(options: ServerOptions, names: Sequence[str]) -> list[tuple[str, Any]]:
    return [(section.name, section.values) for section in options.policy if section.name in names]


async def _close_all(plugins: Sequence[Any]) -> None:
    for plugin in plugins:
        aclose = getattr(plugin, "aclose", None)
        if not callable(aclose):
            continue
        try:
            await aclose()
        except Exception as exc:  # one plugin's failure must not keep the others open
            log.warning(
                "reload: closing the old plugin %s: %s", getattr(plugin, "name", plugin), exc
            )


def build_policy_chain(
    new_options: ServerOptions,
    old_options: ServerOptions,
    old_chain: Sequence[Any],
    clock: Callable[[], float] | None = None,
) -> list[Any]:
    """The policy chain for ``new_options``, with the old routing plugin and rate-limit
    counts carried over (see the module docstring). Raises :class:`ReloadError` naming
    the problem when a table or a file cannot be used."""
    try:
        chain = policy_plugins(new_options, clock)
    except (ValueError, OSError) as exc:
        raise ReloadError(str(exc)) from None
    old_routing = routing_plugin(old_chain)
    new_routing = routing_plugin(chain)
    if _tables(new_options, RESTART_TABLES) != _tables(old_options, RESTART_TABLES):
        log.warning(
            "reload: [[routes]], [queue] and [outbound] change only on restart; "
            "the routing rules of the start stay"
        )
    # The queue holds the start's routing plugin: keep that one where the chain has it.
    if new_routing is not None:
        chain.remove(new_routing)
    if old_routing is not None:
        position = next(
            (
                index
                for index, plugin in enumerate(chain)
                if _module_rank(plugin) > _module_rank(old_routing)
            ),
            len(chain),
        )
        chain.insert(position, old_routing)
    _carry_counts(old_chain, chain)
    return chain


def _module_rank(plugin: Any) -> int:
    """Where a built-in policy plugin's module sits in the chain order."""
    from mailgate.plugins.chain import POLICY_MODULES

    module = type(plugin).__module__
    for rank, policy_module in enumerate(POLICY_MODULES):
        if module == policy_module.__name__ or module.startswith(policy_module.__name__ + "."):
            return rank
    return len(POLICY_MODULES)


def _carry_counts(old_chain: Sequence[Any], new_chain: Sequence[Any]) -> None:
    from mailgate.plugins.rate_limits import RateLimits

    old = next((p for p in old_chain if isinstance(p, RateLimits)), None)
    new = next((p for p in new_chain if isinstance(p, RateLimits)), None)
    if old is not None and new is not None:
        new.take_counts(old)


class PolicyReload:
    """The policy chain a server runs, and its replacement on reload."""

    def __init__(self, chain: Sequence[Any]) -> None:
        self.chain: list[Any] = list(chain)
        #: Old plugins waiting for the connections of their time to end, with that wait.
        self._retiring: dict[asyncio.Task[None], list[Any]] = {}

    def swap(
        self,
        hooks: Hooks,
        new_options: ServerOptions,
        old_options: ServerOptions,
        connections: Callable[[], Set[Any]],
        clock: Callable[[], float] | None = None,
    ) -> None:
        """Build the chain for ``new_options`` and put it in ``hooks`` in place of the
        current one; ``connections()``: the server's open connections (the old plugins
        are closed once those open now have ended). Raises :class:`ReloadError` with
        nothing changed when it cannot."""
        chain = build_policy_chain(new_options, old_options, self.chain, clock)
        old_ids = {id(plugin) for plugin in self.chain}
        new_ids = {id(plugin) for plugin in chain}
        try:
            hooks.replace(self.chain, chain)
        except HookError as exc:
            self._retire([p for p in chain if id(p) not in old_ids], set(), connections)
            raise ReloadError(str(exc)) from None
        old = [plugin for plugin in self.chain if id(plugin) not in new_ids]
        self.chain = chain
        self._retire(old, set(connections()), connections)

    def _retire(
        self, plugins: list[Any], waiting: set[Any], connections: Callable[[], Set[Any]]
    ) -> None:
        if not plugins:
            return

        async def retire() -> None:
            # A connection lives at most its session timeout: the wait is bounded.
            while waiting:
                await asyncio.sleep(0.5)
                waiting.intersection_update(connections())
            await _close_all(plugins)

        task = asyncio.get_running_loop().create_task(retire())
        self._retiring[task] = plugins
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def aclose(self) -> None:
        """At shutdown: close the old plugins still waiting for their connections."""
        for task, plugins in list(self._retiring.items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await _close_all(plugins)
        self._retiring.clear()
