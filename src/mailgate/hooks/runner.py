"""Running one stage's chain: each step in turn until one answers, the middleware around the
chain, the stage's timeout, and a hook's failure turned into ``451 4.3.0`` (logged, never a
traceback to the client). :class:`~mailgate.hooks.Hooks` keeps the chains; this module only
runs the one it is given.
"""

from __future__ import annotations

import asyncio
import dis
import functools
import inspect
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from mailgate.hooks.logs import LogLimiter
from mailgate.hooks.outcomes import _HOOK_FAILED, Outcome, _outcome, _Refusal
from mailgate.hooks.session import Session
from mailgate.hooks.stages import NOTIFICATIONS

# The logger keeps the name of the module this code came from: operators filter on it.
log = logging.getLogger("mailgate.hooks")
#: A hook failing on every command of a session would log a traceback per command: a few
#: per minute for each (session, stage, step), with a count of those held back.
_failures = LogLimiter(burst=5, interval=60.0)


@dataclass(eq=False)
class HookContext:
    """What middleware sees: the stage, the session, the stage's arguments, and the name
    of the step running (set while each step runs)."""

    stage: str
    session: Session
    args: tuple[Any, ...]
    step: str | None = None


Middleware = Callable[[HookContext, Callable[[], Awaitable[Any]]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class _Step:
    """One plugin's method for one stage, made async; ``required``: the reply waits for it;
    ``never_waits``: the method cannot suspend (see :func:`never_waits`)."""

    plugin: str
    call: Callable[..., Awaitable[Any]]
    required: bool
    never_waits: bool = False
    #: A plain function giving what ``call`` would, at once (a built-in plugin's check on
    #: data at hand: relay control at RCPT), for run_chain_now: no coroutine to make and
    #: step to its StopIteration. Found as the plugin's ``_<stage>_now`` method.
    now: Callable[..., Any] | None = None


#: Opcodes by which a coroutine's own code can suspend: await (and the awaits inside
#: ``async with`` / ``async for``), and the yields they compile to.
_SUSPENDING = frozenset(
    dis.opmap[name]
    for name in ("GET_AWAITABLE", "GET_AITER", "GET_ANEXT", "BEFORE_ASYNC_WITH", "YIELD_VALUE")
    if name in dis.opmap
)


def never_waits(func: Callable[..., Any]) -> bool:
    """Whether calling ``func`` and running what it returns to the end cannot suspend: an
    ``async def`` whose body has no ``await``, ``async with`` or ``async for`` (a check on
    data at hand, like relay control). Such a step is run to its end by the caller, with
    no task and no trip through the event loop. Anything else, a plain function included
    (it may hand back a coroutine), is taken to wait."""
    if not inspect.iscoroutinefunction(func):
        return False
    # The function's own code (a bound method lends its function's), never what a
    # decorator wraps: the wrapper may wait where the wrapped does not.
    code = getattr(func, "__code__", None)
    if not isinstance(code, types.CodeType):
        return False
    return not _may_suspend(code)


def _may_suspend(code: types.CodeType) -> bool:
    if any(ins.opcode in _SUSPENDING for ins in dis.get_instructions(code)):
        return True
    # Nested functions and comprehensions: an async comprehension is awaited by the outer
    # code too (GET_AWAITABLE above); the rest are checked to stay on the safe side.
    return any(
        isinstance(const, types.CodeType) and _may_suspend(const) for const in code.co_consts
    )


async def run_chain(
    stage: str,
    steps: tuple[_Step, ...],
    middleware: Sequence[Middleware],
    session: Session,
    args: tuple[Any, ...],
    timeout: float | None,
) -> Outcome:
    """Run ``steps`` for ``stage`` inside ``middleware`` (the first is the outermost):
    None (every step let it through), an Accept, a Reject/TempFail, or an explicit Reply.
    Never raises for a hook's failure: an exception or a timeout is logged and becomes
    ``451 4.3.0``."""
    ctx = HookContext(stage, session, args) if middleware else None
    current: list[str | None] = [None]
    notification = stage in NOTIFICATIONS
    try:
        if ctx is None:
            chain = _call_chain(stage, steps, session, args, None, current, notification)
        else:
            call: Callable[[], Coroutine[Any, Any, Any]] = functools.partial(
                _call_chain, stage, steps, session, args, ctx, current, notification
            )
            for mw in reversed(middleware):
                call = _bind(mw, ctx, call)
            chain = call()
        result = await _with_timeout(chain, timeout)
        if ctx is not None and not notification:
            # What the outermost middleware returned; a bad value is its fault.
            current[0] = None
            result = _outcome(stage, "(middleware)", result)
    except _Refusal as refusal:  # raised by a middleware
        return refusal
    except TimeoutError:
        step = current[0] or "(middleware)"
        _failures.log(
            log,
            logging.ERROR,
            (session.id, stage, step),
            "session %s: %s hook %s took longer than %.1f s",
            session.id,
            stage,
            step,
            timeout,
        )
        return _HOOK_FAILED
    except Exception as exc:
        _log_failure(stage, current[0] or "(middleware)", session, args, exc)
        return _HOOK_FAILED
    if notification:
        return None
    return result  # type: ignore[no-any-return]


async def _call_chain(
    stage: str,
    steps: tuple[_Step, ...],
    session: Session,
    args: tuple[Any, ...],
    ctx: HookContext | None,
    current: list[str | None],
    notification: bool,
) -> Outcome:
    """The steps of one chain in turn (inside the middleware, if any): the first answer
    wins; ``current[0]`` names the step running, for the failure's log line. A module
    function, not a closure of run_chain: mypyc's coroutines of nested functions fail
    ``close()`` once finished, and _with_timeout and _drive close what they ran."""
    for step in steps:
        current[0] = step.plugin
        if ctx is not None:
            ctx.step = step.plugin
        try:
            result = await step.call(session, *args)
        except _Refusal as refusal:
            if notification:
                continue
            return refusal
        except Exception:
            if not notification:
                raise
            # One plugin's failed clean-up must not skip the others' clean-ups.
            _failures.log(
                log,
                logging.ERROR,
                (session.id, stage, step.plugin),
                "session %s: %s hook %s failed",
                session.id,
                stage,
                step.plugin,
                exc_info=True,
            )
            continue
        if notification:
            continue
        outcome = _outcome(stage, step.plugin, result)
        if outcome is not None:
            return outcome
    current[0] = None
    return None


def run_chain_now(
    stage: str, steps: tuple[_Step, ...], session: Session, args: tuple[Any, ...]
) -> Outcome:
    """:func:`run_chain` for a chain that cannot wait (every step :func:`never_waits`, no
    middleware: :meth:`~mailgate.hooks.Hooks.runs_inline`), run to its end here and now.

    The same answers as ``run_chain`` (the first step that decides, a refusal raised by a
    step, ``451 4.3.0`` for a failure), without the coroutines run_chain needs around the
    steps to be able to wait: RCPT through relay control is the commonest command a
    server answers, and those frames were a good part of its cost."""
    step_name = "(none)"
    try:
        for step in steps:
            step_name = step.plugin
            now = step.now
            if now is not None:
                try:
                    result = now(session, *args)
                except _Refusal as refusal:
                    return refusal
            else:
                running = step.call(session, *args)
                try:
                    running.send(None)  # type: ignore[attr-defined]
                except StopIteration as stop:
                    result = stop.value
                except _Refusal as refusal:
                    return refusal
                else:
                    # never_waits() read the step's code: it has no await. Waiting anyway
                    # can only be a bug (a replaced method); the step fails, as a timeout
                    # would.
                    running.close()  # type: ignore[attr-defined]
                    raise RuntimeError(f"{stage} hook {step.plugin} waited, which it cannot")
            if result is not None:  # a step letting it through (the usual answer) needs no call
                outcome = _outcome(stage, step.plugin, result)
                if outcome is not None:
                    return outcome
    except Exception as exc:
        _log_failure(stage, step_name, session, args, exc)
        return _HOOK_FAILED
    return None


def _log_failure(
    stage: str, step: str, session: Session, args: tuple[Any, ...], exc: Exception
) -> None:
    """A step (or middleware) raised: a failed delivery is an operator's matter (one line),
    anything else a bug (its traceback, a few times a minute per session, stage and step)."""
    if stage == "message":
        _log_delivery_failure(session, step, args, exc)
        return
    _failures.log(
        log,
        logging.ERROR,
        (session.id, stage, step),
        "session %s: %s hook %s failed",
        session.id,
        stage,
        step,
        exc_info=exc,
    )


def _log_delivery_failure(
    session: Session, step: str, args: tuple[Any, ...], exc: Exception
) -> None:
    """A delivery that failed (a full disk, a next hop gone) is an operator's matter, not
    a bug: one line with the session, the message and the reason; the traceback only at
    DEBUG (``-v``), for when it is a bug after all."""
    message_id = getattr(args[-1], "id", None) if args else None
    reason = " ".join(str(exc).splitlines()) or "no details"
    log.error(
        "session %s: message %s: delivery %s failed, the client was told to retry: %s: %s",
        session.id,
        message_id,
        step,
        type(exc).__name__,
        reason,
        extra={
            "session": session.id,
            "queue_id": message_id,
            "plugin": step,
            "error": f"{type(exc).__name__}: {reason}",
        },
    )
    log.debug("session %s: delivery %s traceback", session.id, step, exc_info=exc)


async def _with_timeout(coro: Coroutine[Any, Any, Any], timeout: float | None) -> Any:
    """Await ``coro`` within ``timeout`` seconds, paying for the timer only when it waits.

    Most chains finish without waiting for anything (checks on data at hand); arming and
    cancelling a timer for them cost more than the chain itself. So the coroutine is first
    stepped by hand, in the calling task (``current_task()`` still works for the hooks);
    only when it suspends does the rest run under ``asyncio.timeout``."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return stop.value
    except BaseException:
        coro.close()
        raise
    if timeout is None:
        return await _drive(coro, yielded)
    if asyncio.current_task() is None:
        # The caller stepped this chain by hand outside any task, sure it would not wait
        # (every step never_waits); something waited all the same. asyncio.timeout needs a
        # task: hand the rest of the chain to one (the caller's stepper makes it) first.
        await _into_task()
    async with asyncio.timeout(timeout):
        return await _drive(coro, yielded)


async def _drive(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    """Go on running a coroutine that suspended while being stepped by hand, the way a
    Task steps it: wait for the future it yielded, then resume it (the future's
    ``__await__`` then hands it the result or raises). A cancellation of the calling task
    (a timeout, a closed connection) cancels that future, so the coroutine sees it."""
    try:
        while True:
            try:
                if yielded is None:  # a bare yield (asyncio.sleep(0)): give others a turn
                    await asyncio.sleep(0)
                elif getattr(yielded, "_asyncio_future_blocking", None) is not None:
                    yielded._asyncio_future_blocking = False
                    await asyncio.wait((yielded,))
                else:
                    yielded = coro.throw(RuntimeError(f"bad yield in a hook: {yielded!r}"))
                    continue
            except asyncio.CancelledError:
                if yielded is None or not yielded.cancel():
                    yielded = coro.throw(asyncio.CancelledError())
                    continue
                if not yielded.done():  # a task: wait until it has finished cancelling
                    await asyncio.wait((yielded,))
            yielded = coro.send(None)
    except StopIteration as stop:
        return stop.value
    finally:
        coro.close()


@types.coroutine
def _into_task() -> Generator[None, None, None]:
    """A bare yield: a caller stepping its coroutine by hand takes it as "go on in a task"
    (inside a task it is one turn of the loop)."""
    yield


def _bind(
    mw: Middleware, ctx: HookContext, call_next: Callable[[], Awaitable[Any]]
) -> Callable[[], Coroutine[Any, Any, Any]]:
    # A partial of a module coroutine function, not a closure (see _call_chain).
    return functools.partial(_call_middleware, mw, ctx, call_next)


async def _call_middleware(
    mw: Middleware, ctx: HookContext, call_next: Callable[[], Awaitable[Any]]
) -> Any:
    return await mw(ctx, call_next)


__all__ = ["HookContext", "Middleware", "never_waits", "run_chain", "run_chain_now"]
