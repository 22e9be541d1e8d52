"""What ``mailgate serve`` would find wrong only once running, found before it starts.

:func:`preflight` looks at a set of options the way a start would, without starting
anything: it binds no port and writes nothing. It checks that the directories a server
writes to (the state directory, the Maildir, the queue) are directories it could create or
write, that an mbox could be appended to, and builds every plugin the options ask for
(policy tables, users file, aiosmtpd handler, forward and webhook URLs) so that a mistake
in one is reported before the first log line. Every problem is collected, not only the
first: ``mailgate check-config`` lists them all, ``mailgate serve`` stops at the first.

What the plugins log while being built (``no local_domains: ...``) is kept, not printed:
:attr:`Preflight.notes`; the server logs it again when it really starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailgate.server.options import ServerOptions

__all__ = ["Preflight", "preflight"]

#: How an error names a setting (the flag, or the file and key it came from).
Where = Callable[[str], str]


@dataclass
class Preflight:
    """What :func:`preflight` found."""

    #: Each problem as one line, naming the setting it is about.
    problems: list[str] = field(default_factory=list)
    #: The warning lines the plugins would log at start (an open relay, no local_domains).
    warnings: list[str] = field(default_factory=list)
    #: The names of the policy plugins that would run, in chain order.
    policies: list[str] = field(default_factory=list)
    #: How many [[routes]] rules there are.
    routes: int = 0


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def preflight(options: ServerOptions, where: Where = _flag, *, backends: bool = True) -> Preflight:
    """Check ``options`` as a start would, without binding or writing; ``where(key)`` names
    a setting in the messages (default: its flag). ``backends``: also build the auth
    backends, the aiosmtpd handler and the forward and webhook deliveries, and check the
    DNS settings (``mailgate serve`` leaves them to the start, which reports them as
    "cannot start")."""
    result = Preflight()
    _check_paths(options, where, result.problems)
    with _kept_log_records() as records:
        _check_policies(options, result)
        if backends:
            _check_backends(options, where, result.problems)
    result.warnings = [
        record.getMessage() for record in records if record.levelno >= logging.WARNING
    ]
    return result


# -- paths -------------------------------------------------------------------------------


def _check_paths(options: ServerOptions, where: Where, problems: list[str]) -> None:
    if _uses_state_dir(options):
        _writable_directory(options.state_dir, where("state_dir"), problems)
    if options.delivery == "maildir":
        label = where("maildir")
        if _writable_directory(options.maildir, label, problems) and options.maildir.is_dir():
            for name in ("tmp", "new", "cur"):
                sub = options.maildir / name
                if sub.exists() and not sub.is_dir():
                    problems.append(f"{label} {options.maildir}: {name} is not a directory")
    elif options.delivery == "mbox" and options.mbox is not None:
        _appendable_file(options.mbox, where("mbox"), problems)
    if any(section.name in ("routes", "queue") for section in options.policy):
        from mailgate.config import ConfigError
        from mailgate.queue.settings import queue_settings

        # A bad [queue] table is reported by the configuration reader already.
        with contextlib.suppress(ConfigError):
            directory = queue_settings(options.policy).directory(options.state_dir)
            _writable_directory(directory, "[queue] path", problems)


def _uses_state_dir(options: ServerOptions) -> bool:
    """Whether a server with these options writes to its state directory: a server with
    its own certificate delivering to a Maildir (which spools in the Maildir's tmp/) may
    run where the default ./.mailgate cannot be made, and must still start."""
    spools_there = options.delivery == "mbox" or (
        options.delivery == "sink"
        and bool(options.forward or options.webhook or options.aiosmtpd_handler)
    )
    tables = {section.name for section in options.policy}
    return (
        options.tls_cert is None
        or spools_there
        or options.auth_capture is not None
        or options.greylist
        or bool(tables & {"greylisting", "routes", "queue"})
    )


def _writable_directory(path: Path, label: str, problems: list[str]) -> bool:
    """Whether ``path`` is a directory that can be written, or could be made; else a
    problem is added (and False returned)."""
    if path.exists():
        if not path.is_dir():
            problems.append(f"{label} {path}: exists and is not a directory")
            return False
        if not os.access(path, os.W_OK | os.X_OK):
            problems.append(f"{label} {path}: directory is not writable")
            return False
        return True
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        problems.append(f"{label} {path}: cannot be created, {ancestor} is not a directory")
        return False
    if not os.access(ancestor, os.W_OK | os.X_OK):
        problems.append(f"{label} {path}: cannot be created, {ancestor} is not writable")
        return False
    return True


def _existing_ancestor(path: Path) -> Path:
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _appendable_file(path: Path, label: str, problems: list[str]) -> None:
    """An mbox: an existing regular file that can be written, in a directory where the
    dotlock can be made; or a new file in an existing writable directory (the mbox
    delivery creates the file, not its directory)."""
    directory = path.absolute().parent
    if path.exists():
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            problems.append(f"{label} {path}: not a regular file")
            return
        if not os.access(path, os.W_OK):
            problems.append(f"{label} {path}: file is not writable")
            return
    elif not directory.exists():
        problems.append(f"{label} {path}: directory {directory} does not exist")
        return
    if not directory.is_dir():
        problems.append(f"{label} {path}: {directory} is not a directory")
    elif not os.access(directory, os.W_OK | os.X_OK):
        # The lock file (FILE.lock) and a new mbox are made in the directory.
        problems.append(f"{label} {path}: directory {directory} is not writable")


# -- plugins -----------------------------------------------------------------------------


def _check_policies(options: ServerOptions, result: Preflight) -> None:
    from mailgate.plugins import chain
    from mailgate.plugins.policy import PolicyEnv

    env = PolicyEnv(options)
    for module in chain.POLICY_MODULES:
        try:
            plugins = module.plugins_from_options(env)
        except (ValueError, OSError) as exc:
            result.problems.append(_one_line(exc))
            continue
        result.policies.extend(getattr(plugin, "name", type(plugin).__name__) for plugin in plugins)
    result.routes = sum(1 for section in options.policy if section.name == "routes")


def _check_backends(options: ServerOptions, where: Where, problems: list[str]) -> None:
    _try(problems, _dns_settings, options)
    if options.users_file is not None:
        _try(problems, _users_file, options.users_file, where("users_file"))
    if options.aiosmtpd_handler is not None:
        _try(problems, _aiosmtpd_handler, options)
    for url in options.forward:
        _try(problems, _forward, url, options.hostname)
    for url in options.webhook:
        _try(problems, _webhook, url)


def _try(problems: list[str], check: Callable[..., Any], *args: Any) -> None:
    try:
        check(*args)
    except Exception as exc:  # any error a plugin's constructor has (a handler's own)
        problems.append(_one_line(exc))


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.splitlines())


def _dns_settings(options: ServerOptions) -> None:
    from mailgate.dns import Resolver

    Resolver(options.dns_nameservers, timeout=options.dns_timeout)


def _users_file(path: Path, label: str) -> None:
    from mailgate.plugins.users_file import UsersFile, UsersFileError

    try:
        UsersFile(path)
    except UsersFileError as exc:
        raise ValueError(f"{label}: {exc}") from None


def _aiosmtpd_handler(options: ServerOptions) -> None:
    from mailgate.compat.aiosmtpd import load_handler

    assert options.aiosmtpd_handler is not None
    load_handler(options.aiosmtpd_handler)


def _forward(url: str, hostname: str) -> None:
    from mailgate.delivery.forward import ForwardDelivery

    ForwardDelivery(url, helo_name=hostname)


def _webhook(url: str) -> None:
    from mailgate.delivery.webhook import WebhookDelivery

    WebhookDelivery(url)


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _kept_log_records() -> Iterator[list[logging.LogRecord]]:
    """What mailgate's loggers log inside the block is kept, not printed (the plugins are
    built again, and log it, when the server starts)."""
    logger = logging.getLogger("mailgate")
    keep = _Keep()
    saved = (logger.propagate, logger.level)
    logger.addHandler(keep)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield keep.records
    finally:
        logger.removeHandler(keep)
        logger.propagate, logger.level = saved
