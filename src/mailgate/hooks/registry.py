"""The registry: :class:`Hooks`, the ordered set of plugins and middleware a server
consults. Adding plugins, callbacks (one-step plugins) and middleware, ordering them
(``before=``/``after=``, a stable topological sort) and keeping each stage's chain ready;
the chain itself is run by :mod:`mailgate.hooks.runner`.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from mailgate.hooks.outcomes import HookError, Outcome
from mailgate.hooks.runner import Middleware, _Step, never_waits, run_chain, run_chain_now
from mailgate.hooks.session import Session
from mailgate.hooks.stages import NOTIFICATIONS, STAGES

#: A plugin's stage method or a callback: async or plain, called with the stage's arguments.
Step = Callable[..., Any]

#: How a stage is answered (:meth:`Hooks.mode`): nothing runs there; its chain runs to its
#: end at once (:meth:`Hooks.runs_inline`, :meth:`Hooks.run_now`); it may wait (a task).
NOTHING: Final = 0
INLINE: Final = 1
WAITS: Final = 2


@dataclass(eq=False)
class _Plugin:
    name: str
    obj: Any
    before: tuple[str, ...]
    after: tuple[str, ...]


_anonymous = itertools.count(1)


def _as_async(func: Step) -> Callable[..., Awaitable[Any]]:
    if inspect.iscoroutinefunction(func):
        return func

    @functools.wraps(func)
    async def call(*args: Any) -> Any:
        result = func(*args)
        if inspect.isawaitable(result):  # a plain function that returns a coroutine
            result = await result
        return result

    return call


class Hooks:
    """The ordered set of plugins and middleware a server consults.

    ``timeout`` bounds every stage's chain except ``message``; ``message_timeout`` bounds
    the message stage (deliveries). ``None``: no limit.
    """

    def __init__(self, *, timeout: float | None = 30.0, message_timeout: float | None = 300.0):
        self.timeout = timeout
        self.message_timeout = message_timeout
        self._plugins: list[_Plugin] = []
        self._middleware: list[Middleware] = []
        self._chains: dict[str, tuple[_Step, ...]] | None = None
        #: Per stage: whether its required steps never wait (see runs_inline); built with
        #: the chains. (Not ``_inline``: mypyc names the C field ``__inline``, a C keyword.)
        self._inline_stages: dict[str, bool] | None = None
        #: Per stage: NOTHING, INLINE or WAITS (see mode); built with the chains, and made
        #: anew when a plugin or a middleware comes or goes.
        self._modes: dict[str, int] = {}
        #: The required steps of each stage that runs inline (no notification): run_now's.
        self._now_chains: dict[str, tuple[_Step, ...]] = {}

    # --- registration -------------------------------------------------------------------

    def add(
        self,
        plugin: Any,
        *,
        name: str | None = None,
        before: str | Sequence[str] = (),
        after: str | Sequence[str] = (),
        index: int | None = None,
    ) -> Any:
        """Add a plugin object. Its order: after every name in ``after``, before every
        name in ``before``, otherwise in the order added (``index``: as if it had been
        added at that position, e.g. 0 for ahead of everything so far). Returns the plugin.

        A plugin whose ``required`` attribute is False runs at the message stage after
        the reply (in the background, on its own link to the message file); its failures
        are logged and do not change the reply."""
        plugin_name = name or getattr(plugin, "name", None) or f"plugin-{next(_anonymous)}"
        if not isinstance(plugin_name, str) or not plugin_name:
            raise HookError(f"plugin name must be a non-empty string, not {plugin_name!r}")
        if any(p.name == plugin_name for p in self._plugins):
            raise HookError(f"a plugin named {plugin_name!r} is already registered")
        if not any(callable(getattr(plugin, f"on_{stage}", None)) for stage in STAGES):
            raise HookError(
                f"plugin {plugin_name!r} has no stage method (on_connect, on_rcpt, ...)"
            )
        entry = _Plugin(plugin_name, plugin, _names(before), _names(after))
        if index is None:
            self._plugins.append(entry)
        else:
            self._plugins.insert(index, entry)
        try:
            self._order(strict=False)  # a cycle is an error now, at registration
        except HookError:
            self._plugins.remove(entry)
            raise
        self._forget_chains()
        return plugin

    def replace(self, old: Sequence[Any], new: Sequence[Any]) -> None:
        """Swap the plugin objects ``old`` for ``new`` in one step (a reload of the
        policy chain): the new ones take the place of the first old one (the front when
        none of ``old`` is registered), in their order; every other plugin keeps its place
        and its ordering. Checked before anything changes: a new plugin without a name or
        a stage method, a name clash or an ordering cycle raises :class:`HookError` and
        leaves the registry as it was. A stage already running finishes with the steps
        it started with; the next stage runs the new chain."""
        gone = {id(plugin) for plugin in old}
        kept = [p for p in self._plugins if id(p.obj) not in gone]
        position = next((i for i, p in enumerate(self._plugins) if id(p.obj) in gone), 0)
        # Where the first old plugin was, counted among those that stay.
        position = sum(1 for p in self._plugins[:position] if id(p.obj) not in gone)
        names = {p.name for p in kept}
        entries: list[_Plugin] = []
        for plugin in new:
            plugin_name = getattr(plugin, "name", None)
            if not isinstance(plugin_name, str) or not plugin_name:
                raise HookError(f"plugin {plugin!r} has no name")
            if plugin_name in names:
                raise HookError(f"a plugin named {plugin_name!r} is already registered")
            if not any(callable(getattr(plugin, f"on_{stage}", None)) for stage in STAGES):
                raise HookError(f"plugin {plugin_name!r} has no stage method")
            names.add(plugin_name)
            entries.append(_Plugin(plugin_name, plugin, (), ()))
        previous = self._plugins
        self._plugins = kept[:position] + entries + kept[position:]
        try:
            self._order(strict=False)
        except HookError:
            self._plugins = previous
            raise
        self._forget_chains()

    def remove(self, name: str) -> None:
        before = len(self._plugins)
        self._plugins = [p for p in self._plugins if p.name != name]
        if len(self._plugins) == before:
            raise HookError(f"no plugin named {name!r}")
        self._forget_chains()

    def on(self, stage: str, func: Step, *, name: str | None = None, **order: Any) -> Step:
        """Register one callback (async or plain) for one stage: a one-step plugin."""
        if stage not in STAGES:
            raise HookError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        if not callable(func):
            raise HookError(f"callback for {stage!r} must be callable, not {func!r}")
        holder = type(f"Callback_{stage}", (), {f"on_{stage}": staticmethod(func)})()
        for attribute in ("required", "auth_mechanisms"):
            if hasattr(func, attribute):
                setattr(holder, attribute, getattr(func, attribute))
        qualname = getattr(func, "__qualname__", None) or f"callback-{next(_anonymous)}"
        self.add(holder, name=name or f"{stage}:{qualname}", **order)
        return func

    def use(self, middleware: Middleware) -> Middleware:
        """Wrap every stage call: ``async def mw(ctx, call_next): ... await call_next()``.
        The first middleware added is the outermost."""
        if not inspect.iscoroutinefunction(middleware) and not callable(middleware):
            raise HookError(f"middleware must be an async function, not {middleware!r}")
        self._middleware.append(middleware)
        self._forget_chains()  # no stage runs inline any more
        return middleware

    def names(self) -> list[str]:
        """Plugin names in the order their steps run."""
        return [p.name for p in self._order(strict=False)]

    def check(self) -> None:
        """Raise :class:`HookError` if a before/after names a plugin that is not there."""
        self._order(strict=True)

    def plugins(self) -> list[Any]:
        return [p.obj for p in self._order(strict=False)]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.plugins())

    # --- running ------------------------------------------------------------------------

    def has(self, stage: str) -> bool:
        """Whether anything runs at ``stage`` (the server skips the await when not)."""
        return bool(self._middleware) or bool(self._chain(stage))

    def mode(self, stage: str) -> int:
        """How ``stage`` is answered, in one question (the server asks at every command):
        :data:`NOTHING` (not :meth:`has`), :data:`INLINE` (:meth:`has` and
        :meth:`runs_inline`: :meth:`run_now` gives the answer) or :data:`WAITS`."""
        modes = self._modes
        if not modes:
            self._chain(stage)  # builds the chains and the modes
            modes = self._modes
        return modes[stage]

    def has_steps(self, stage: str) -> bool:
        """Whether some plugin (not only middleware) has a step at ``stage``."""
        return bool(self._chain(stage))

    def runs_inline(self, stage: str) -> bool:
        """Whether the chain of ``stage`` cannot wait: no middleware, and every step the
        reply waits for is an ``async def`` with no await (:func:`~.runner.never_waits`).
        The server then runs it to its end in the protocol callback, without a task."""
        if self._middleware:
            return False
        self._chain(stage)  # builds the chains and their answers to this question
        inline = self._inline_stages
        assert inline is not None
        return inline[stage]

    def background_steps(self, stage: str) -> tuple[_Step, ...]:
        """Steps marked ``required = False``: the server runs them after replying."""
        return tuple(s for s in self._chain(stage) if not s.required)

    def run(self, stage: str, session: Session, *args: Any) -> Coroutine[Any, Any, Outcome]:
        """Run the chain for ``stage`` (to be awaited): None (every step let it through),
        an Accept, a Reject/TempFail, or an explicit Reply. Never raises for a hook's
        failure: an exception or a timeout is logged and becomes ``451 4.3.0``."""
        # A plain method handing back the runner's coroutine: no second coroutine frame per
        # stage of every command.
        timeout = self.message_timeout if stage == "message" else self.timeout
        return run_chain(
            stage, self._chain(stage, required=True), self._middleware, session, args, timeout
        )

    def run_now(self, stage: str, session: Session, *args: Any) -> Outcome:
        """What :meth:`run` answers, computed at once, for a stage that
        :meth:`runs_inline` (the caller checks that first; anything else is a bug)."""
        steps = self._now_chains.get(stage)
        if steps is None:
            self._chain(stage)  # the chains may not be built yet
            steps = self._now_chains.get(stage)
            if steps is None:
                raise HookError(f"{stage}: run_now() is only for a stage that runs inline")
        return run_chain_now(stage, steps, session, args)

    def _forget_chains(self) -> None:
        """The plugins or the middleware changed: the chains are built anew when next
        asked for."""
        self._chains = None
        self._modes = {}
        self._now_chains = {}

    def _chain(self, stage: str, *, required: bool = False) -> tuple[_Step, ...]:
        """The steps of ``stage`` in order (``required``: only those the reply waits for).
        Computed once per change of the plugin set: the server asks on every command."""
        chains = self._chains
        if chains is None:
            ordered = self._order(strict=False)
            chains = {}
            for s in STAGES:
                steps = tuple(
                    _Step(
                        p.name,
                        _as_async(method),
                        bool(getattr(p.obj, "required", True)),
                        never_waits(method),
                        _now_method(p.obj, s) if never_waits(method) else None,
                    )
                    for p in ordered
                    if callable(method := getattr(p.obj, f"on_{s}", None)) and _takes_part(p.obj, s)
                )
                chains[s] = steps
                chains["required:" + s] = tuple(step for step in steps if step.required)
            # Asked on every command: answered once per change of the plugin set.
            inline = self._inline_stages = {
                s: all(step.never_waits for step in chains["required:" + s]) for s in STAGES
            }
            waits = bool(self._middleware)  # middleware may wait, at every stage
            self._modes = {
                s: WAITS if waits else NOTHING if not chains[s] else INLINE if inline[s] else WAITS
                for s in STAGES
            }
            self._now_chains = {
                s: chains["required:" + s]
                for s in STAGES
                if inline[s] and not waits and s not in NOTIFICATIONS
            }
            self._chains = chains
        return chains["required:" + stage if required else stage]

    def _order(self, *, strict: bool) -> list[_Plugin]:
        """Stable topological order honouring before/after; registration order breaks
        ties. ``strict``: a name that is not registered is an error."""
        plugins = self._plugins
        index = {p.name: i for i, p in enumerate(plugins)}
        edges: dict[int, set[int]] = {i: set() for i in range(len(plugins))}
        for i, p in enumerate(plugins):
            for relation, names in (("after", p.after), ("before", p.before)):
                for other in names:
                    if other not in index:
                        if strict:
                            known = ", ".join(index) or "none"
                            raise HookError(
                                f"plugin {p.name!r} is ordered {relation} {other!r}, which "
                                f"is not registered (plugins: {known})"
                            )
                        continue
                    if relation == "after":
                        edges[index[other]].add(i)
                    else:
                        edges[i].add(index[other])
        incoming = dict.fromkeys(edges, 0)
        for targets in edges.values():
            for t in targets:
                incoming[t] += 1
        # A plugin ordered before another takes that one's place in the queue, not its
        # own: added last with before="mail-auth", it runs just before mail-auth instead of
        # pushing mail-auth behind every plugin registered in between.
        rank = _earliest_successor(edges)
        ready = [i for i in edges if incoming[i] == 0]
        order: list[int] = []
        while ready:
            ready.sort(key=lambda i: (rank[i], i))
            i = ready.pop(0)
            order.append(i)
            for t in edges[i]:
                incoming[t] -= 1
                if incoming[t] == 0:
                    ready.append(t)
        if len(order) != len(plugins):
            cycle = [plugins[i].name for i in edges if i not in order]
            raise HookError(f"plugin ordering has a cycle among: {', '.join(cycle)}")
        return [plugins[i] for i in order]


def _earliest_successor(edges: Mapping[int, set[int]]) -> dict[int, int]:
    """For each node, the lowest index among itself and everything that must come after
    it (iteratively, so long chains need no recursion; a cycle is reported by the caller)."""
    rank = {i: i for i in edges}
    changed = True
    rounds = 0
    while changed and rounds <= len(edges):
        changed = False
        rounds += 1
        for i, targets in edges.items():
            best = min((rank[t] for t in targets), default=rank[i])
            if best < rank[i]:
                rank[i] = best
                changed = True
    return rank


def _now_method(plugin: Any, stage: str) -> Step | None:
    """A built-in plugin's plain ``_<stage>_now`` twin of its ``on_<stage>`` (same
    arguments, same answer, raised refusals included), which run_chain_now calls instead of
    stepping the coroutine. Only when the class that defines ``on_<stage>`` defines the
    twin too: a subclass's own on_<stage>, or one replaced on the instance (a test's
    stand-in), is run as it is."""
    name = f"on_{stage}"
    if name in getattr(plugin, "__dict__", {}):
        return None
    owner = next((c for c in type(plugin).__mro__ if name in vars(c)), None)
    if owner is None or f"_{stage}_now" not in vars(owner):
        return None
    now = getattr(plugin, f"_{stage}_now", None)
    return cast(Step, now) if callable(now) else None


def _takes_part(plugin: Any, stage: str) -> bool:
    """A plugin may narrow the stages it runs at with a ``stages`` attribute (a set of
    names), e.g. leave out ``message`` when its configuration needs nothing there: a
    message step makes the server spool every message for it."""
    stages = getattr(plugin, "stages", None)
    return stages is None or stage in stages


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


__all__ = ["Hooks", "Step"]
