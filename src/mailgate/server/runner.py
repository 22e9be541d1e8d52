"""Process-level running: event loop choice, signals, and N workers sharing one port.

The runner starts whatever server it is given or can make (:class:`~.host.RunnableServer`):
the core :class:`~.app.SMTPServer`, the ``mailgate.Server`` facade, a honeypot server. It
does not import the server class, so nothing here decides which plugins a server has.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable

from .errors import StartupError
from .host import RunnableServer
from .logs import flush_logs, setup_logging
from .options import ServerOptions

log = logging.getLogger("mailgate.server")

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: Makes the server of one process (of each worker) from the options.
ServerFactory = Callable[[ServerOptions], RunnableServer]
Reloader = Callable[[], ServerOptions]


def _install_uvloop() -> str:
    """uvloop when installed (mailgate[fast]); MAILGATE_LOOP=asyncio keeps the stock loop."""
    if os.environ.get("MAILGATE_LOOP", "").lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def serve(
    server: RunnableServer,
    *,
    reload_options: Reloader | None = None,
    reuse_port: bool = False,
    started: Callable[[RunnableServer], None] | None = None,
) -> None:
    """Run ``server`` until SIGTERM/SIGINT; SIGHUP reloads certificates and settings."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_stop(signame: str) -> None:
        if not stopping.is_set():
            log.info(
                "%s received: finishing transactions in flight (up to %.0f s)",
                signame,
                server.options.close_timeout,
            )
            stopping.set()

    def on_hup() -> None:
        if reload_options is None:
            log.info("SIGHUP: reloading certificates")
            server.reload(server.options)
            return
        try:
            new = reload_options()
        except Exception as exc:  # a bad new config must not take the server down
            log.error("SIGHUP: configuration not reloaded: %s", exc)
            return
        server.reload(new)

    # Handlers first: a signal that arrives while the listeners open must not kill us.
    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    # A forked worker starts with these blocked (see _run_workers); one that arrived
    # meanwhile is delivered now, to the handlers above.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    await server.start(reuse_port=reuse_port)
    if started is not None:
        started(server)
    await stopping.wait()
    await server.shutdown()
    log.info("stopped; %d messages accepted", server.messages_accepted)


def _settle_heap(_server: RunnableServer) -> None:
    """Tune the garbage collector for serving, once the server has started (``serve``'s
    ``started`` when this module runs the process: an embedding program that awaits
    ``serve()`` itself keeps its own collector settings).

    Every connection and message allocates a few dozen container objects that reference
    counting frees; the cyclic collector still runs on the count of allocations. Measured
    with 100 clients and a connection per message (the defaults: a collection of the
    youngest generation every 700 net allocations): about 5 us of collector time per
    message, a third of it full collections walking the ~47,000 objects made at start-up
    (modules, settings, plugins, their tables), which never become garbage. So: collect
    once, then gc.freeze() moves those out of the collector's sight (frozen objects are
    still freed by reference counting; only a cycle among them would wait for exit), and
    the youngest generation is collected every 7,000 allocations instead of 700: it holds
    the objects of the connections open at that moment whatever its threshold, so fewer
    collections walk about the same number each. Together under 1 us per message."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(_YOUNGEST_THRESHOLD, middle, oldest)


#: Allocations between two collections of the youngest generation once serving (see
#: _settle_heap; Python's default is 700).
_YOUNGEST_THRESHOLD = 7000


def run_server(server: RunnableServer) -> int:
    """``SMTPServer.run()``: one process, until SIGINT/SIGTERM. Start-up problems are
    logged and give exit status 2."""
    options = server.options
    setup_logging(options.log_format, options.log_level)
    _install_uvloop()
    try:
        asyncio.run(serve(server, started=_settle_heap))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 2
    except KeyboardInterrupt:  # pragma: no cover - signal handler normally catches it
        return 130
    return 0


def run(
    options: ServerOptions,
    make_server: ServerFactory,
    *,
    reload_options: Reloader | None = None,
) -> int:
    """Run ``make_server(options)`` in this process (or one in each of ``options.workers``
    child processes, made in the child)."""
    setup_logging(options.log_format, options.log_level)
    engine = _install_uvloop()
    log.debug(
        "mailgate starting (%s, %d worker%s)",
        engine,
        options.workers,
        "s" if options.workers > 1 else "",
    )
    if options.workers <= 1:
        return _run_one(options, make_server, reload_options, reuse_port=False)
    return _run_workers(options, make_server, reload_options)


def _run_one(
    options: ServerOptions,
    factory: ServerFactory,
    reload_options: Reloader | None,
    *,
    reuse_port: bool,
) -> int:
    try:
        asyncio.run(
            _serve_new(options, factory, reload_options=reload_options, reuse_port=reuse_port)
        )
    except StartupError:
        raise
    except KeyboardInterrupt:  # pragma: no cover - signal handler normally catches it
        return 130
    return 0


async def _serve_new(
    options: ServerOptions,
    factory: ServerFactory,
    *,
    reload_options: Reloader | None,
    reuse_port: bool,
) -> None:
    # Made inside the running loop, as a server made by serve() always was: plugins that
    # look for the loop when they are built find this one.
    await serve(
        factory(options),
        reload_options=reload_options,
        reuse_port=reuse_port,
        started=_settle_heap,
    )


def _run_workers(
    options: ServerOptions, factory: ServerFactory, reload_options: Reloader | None
) -> int:
    """Fork N workers that each bind the port with SO_REUSEPORT; the kernel spreads
    connections. The parent forwards signals and reports the first failure."""
    _check_bindable(options)
    children: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    # Installed before forking, so no signal falls between fork and handler; a child's own
    # loop replaces them. A signal a child receives before its loop is up is held back.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for _ in range(options.workers):
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        pid = os.fork()
        if pid == 0:  # child
            for signum in _FORWARDED:
                signal.signal(signum, signal.SIG_DFL)
            code = 1
            try:
                code = _run_one(options, factory, reload_options, reuse_port=True)
            except StartupError as exc:
                print(f"mailgate: {exc}", file=sys.stderr)
                code = 2
            except BaseException:  # a worker must never return into the parent's code
                logging.getLogger("mailgate").exception("worker crashed")
            finally:
                flush_logs()  # os._exit skips the exit handlers that would write them
                os._exit(code)
        children.append(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    status = 0
    remaining = set(children)
    while remaining:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
            continue
        remaining.discard(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0 and status == 0:
            status = code if code > 0 else 1
            log.error("worker %d exited with %d; stopping the others", pid, code)
            forward(signal.SIGTERM, None)
    return status


def _check_bindable(options: ServerOptions) -> None:
    """With SO_REUSEPORT another process of ours could share the port silently; bind once
    without it first so 'port in use' is reported as such."""
    import socket

    for address in options.listen:
        if address.port == 0:
            raise StartupError(f"{address}: --workers needs a fixed port, not 0")
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address.host, address.port))
            except OSError as exc:
                raise StartupError(f"cannot listen on {address}: {exc.strerror or exc}") from None
