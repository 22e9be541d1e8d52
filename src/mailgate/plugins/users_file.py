"""AUTH PLAIN/LOGIN against a file of argon2 password hashes.

The file has one user per line, ``username:$argon2id$v=19$m=...``; lines starting with
``#`` and blank lines are ignored. ``mailgate users add/remove/list`` manage it (see
:mod:`mailgate.cli.users`); both sides use the reading and atomic writing helpers here, so
a file the command wrote is always one the server can load.

Checking a password costs an argon2 verification (tens of milliseconds, tens of MiB), so
it runs in a worker thread, never on the event loop, and at most ``max_concurrent`` run
at once (a burst of attempts must not take all the memory). Unknown users are checked
against a dummy hash made with the same parameters as the real ones, so the answer takes
as long whether the user exists or not.

The file is looked at again (``stat``) at most once per ``check_interval`` seconds, when
an attempt comes in; a changed file is read again, so ``mailgate users add`` takes effect
without a restart. A file that vanished or is broken at that point leaves the users
loaded before in place, with an error in the log.

When a user logs in with a hash made with other parameters than the plugin's hasher
(argon2-cffi raised its defaults, say), the hash is replaced in the file -- only when it
can be done safely: the file belongs to the user running the server, the directory lock
is available, and the line still holds the hash that was checked. Otherwise the old hash
stays and keeps working.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import secrets
import tempfile
import threading
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from argon2 import Parameters, PasswordHasher, extract_parameters
from argon2.exceptions import Argon2Error, InvalidHashError
from argon2.low_level import ARGON2_VERSION

from mailgate.hooks import Accept, AuthAttempt, HookError, Reject, Session

log = logging.getLogger("mailgate.plugins.users_file")

_REFUSED = "Authentication credentials invalid"


class UsersFileError(HookError, ValueError):
    """The users file cannot be read or is not in the expected format (one line)."""


# --- the file format -------------------------------------------------------------------------


def check_username(username: str) -> None:
    """Raise :class:`ValueError` if ``username`` cannot be a line of the users file."""
    if not username:
        raise ValueError("the user name is empty")
    if username.startswith("#"):
        raise ValueError("a user name cannot start with '#' (that marks a comment)")
    for char in username:
        if char == ":":
            raise ValueError("a user name cannot contain ':'")
        if char.isspace():
            raise ValueError("a user name cannot contain white space")
        # Cc: control characters; Cs: lone surrogates (undecodable bytes on the command
        # line), which could not be written as UTF-8.
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise ValueError("a user name cannot contain control characters")


def check_hash(value: str) -> Parameters:
    """The argon2 parameters of ``value``; ValueError if it is not an argon2 hash."""
    if not value.isascii() or not value.startswith("$argon2"):
        raise ValueError("not an argon2 hash")
    try:
        return extract_parameters(value)
    except InvalidHashError:
        raise ValueError("not a valid argon2 hash") from None


@dataclass
class UsersDocument:
    """A users file as lines, so that rewriting it keeps comments and order."""

    lines: list[str] = field(default_factory=list)
    #: username -> index in ``lines``
    index: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> UsersDocument:
        """Parse ``text``; a bad line raises ValueError naming its number (never its
        content: it may hold a hash)."""
        doc = cls(text.splitlines())
        for number, line in enumerate(doc.lines, 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            username, sep, hashed = stripped.partition(":")
            if not sep:
                raise ValueError(f"line {number}: expected 'username:argon2-hash'")
            try:
                check_username(username)
                check_hash(hashed.strip())
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}") from None
            if username in doc.index:
                first = doc.index[username] + 1
                raise ValueError(
                    f"line {number}: user {username!r} is already defined on line {first}"
                )
            doc.index[username] = number - 1
        return doc

    def users(self) -> dict[str, str]:
        """username -> hash."""
        return {name: self.hash_of(name) for name in self.index}

    def hash_of(self, username: str) -> str:
        return self.lines[self.index[username]].strip().partition(":")[2].strip()

    def set(self, username: str, hashed: str) -> bool:
        """Add or replace ``username``'s hash; True if the user was there already."""
        line = f"{username}:{hashed}"
        if username in self.index:
            self.lines[self.index[username]] = line
            return True
        self.index[username] = len(self.lines)
        self.lines.append(line)
        return False

    def remove(self, username: str) -> bool:
        """Remove ``username``; False if there was no such user."""
        position = self.index.pop(username, None)
        if position is None:
            return False
        del self.lines[position]
        self.index = {n: i - 1 if i > position else i for n, i in self.index.items()}
        return True

    def render(self) -> str:
        return "".join(f"{line}\n" for line in self.lines)


def read_document(path: Path, *, missing_ok: bool = False) -> UsersDocument:
    """Read and parse ``path``; UsersFileError (one line) when that fails. With
    ``missing_ok`` a file that does not exist reads as an empty one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return UsersDocument()
        raise UsersFileError(f"users file {path} does not exist") from None
    except UnicodeDecodeError:
        raise UsersFileError(f"users file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UsersFileError(f"cannot read users file {path}: {exc.strerror or exc}") from None
    try:
        return UsersDocument.parse(text)
    except ValueError as exc:
        raise UsersFileError(f"users file {path}: {exc}") from None


@contextlib.contextmanager
def locked_directory(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the directory of ``path`` while a read-modify-write of
    the users file runs, so two writers (the command and a server rehashing, or several
    server processes) never lose each other's change. A lock on the file itself would
    not do: every write replaces the file with a new one."""
    fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_document(path: Path, doc: UsersDocument) -> None:
    """Replace ``path`` with ``doc`` atomically: a temporary file in the same directory,
    fsynced, renamed over the old one, then the directory fsynced. A new file gets mode
    0600; an existing one keeps its mode, and its owner and group where permitted."""
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if old is not None:
                os.fchmod(f.fileno(), old.st_mode & 0o7777)
                with contextlib.suppress(PermissionError):
                    # Keeps a group the server reads the file through (root:mailgate 0640).
                    os.fchown(f.fileno(), old.st_uid, old.st_gid)
            f.write(doc.render())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def real_path(path: str | os.PathLike[str]) -> Path:
    """``path`` with symbolic links resolved: a rewrite replaces the file a link points
    to, not the link."""
    return Path(os.path.realpath(path))


# --- the plugin ------------------------------------------------------------------------------


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    """What tells that the file changed: a rename gives a new inode, an edit in place a
    new size or mtime. None: the file is not there (or cannot be looked at)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _hasher_parameters(hasher: PasswordHasher) -> Parameters:
    return Parameters(
        type=hasher.type,
        version=ARGON2_VERSION,
        salt_len=hasher.salt_len,
        hash_len=hasher.hash_len,
        time_cost=hasher.time_cost,
        memory_cost=hasher.memory_cost,
        parallelism=hasher.parallelism,
    )


def _parameters_key(p: Parameters) -> tuple[object, ...]:
    # Parameters is an unhashable dataclass.
    return (p.type, p.version, p.salt_len, p.hash_len, p.time_cost, p.memory_cost, p.parallelism)


@dataclass(frozen=True)
class _Table:
    """One loaded version of the file: replaced as a whole, so a thread sees either the
    old users or the new ones, never a mixture."""

    signature: tuple[int, int, int, int] | None
    users: dict[str, str]
    #: A hash of a random secret with the users' most common parameters.
    dummy: str


class UsersFile:
    """The ``users-file`` auth backend (``users_file = "..."`` / ``--users-file``).

    ``hasher``: the argon2 settings new hashes should have (default: argon2-cffi's,
    which ``mailgate users add`` uses); ``rehash``: replace a user's hash made with other
    settings at their next login (see the module documentation for when it is skipped).
    """

    name = "users-file"
    #: Only hashes are stored, so the password has to travel: no CRAM-MD5.
    auth_mechanisms = ("PLAIN", "LOGIN")

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        hasher: PasswordHasher | None = None,
        check_interval: float = 1.0,
        rehash: bool = True,
        max_concurrent: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.hasher = hasher or PasswordHasher()
        self.check_interval = check_interval
        self.rehash = rehash
        self._dummies: dict[tuple[object, ...], str] = {}
        self._reload_lock = threading.Lock()
        try:
            self._table = self._load(_signature(self.path))
        except UsersFileError as exc:
            if self.path.exists():
                raise
            raise UsersFileError(
                f"{exc}; create it with: mailgate users add USER --file {self.path}"
            ) from None
        self._seen = self._table.signature
        self._next_check = time.monotonic() + check_interval
        self._slots = asyncio.Semaphore(max_concurrent or max(2, os.cpu_count() or 2))
        if not self._table.users:
            log.warning("users file %s has no users: every AUTH will be refused", self.path)
        else:
            log.info("users file %s: %d users", self.path, len(self._table.users))

    @property
    def usernames(self) -> list[str]:
        """The users currently loaded."""
        return list(self._table.users)

    async def on_auth(self, session: Session, auth: AuthAttempt) -> Accept | None:
        if auth.password is None:
            return None  # CRAM-MD5 or XOAUTH2 offered by setting: for another backend
        loop = asyncio.get_running_loop()
        async with self._slots:
            known, valid = await loop.run_in_executor(
                None, self._check, auth.username, auth.password
            )
        # Checked after the (equally slow) verification, so it does not change the timing.
        if valid and auth.authzid in (None, "", auth.username):
            return Accept()
        if not known:
            # Not ours to refuse: another backend (or none, and so 535) decides.
            log.info(
                "session %s: AUTH %s: %r is not in the users file",
                session.id,
                auth.method,
                auth.username,
            )
            return None
        reason = f"may not act for {auth.authzid!r}" if valid else "wrong password"
        log.info(
            "session %s: AUTH %s refused for %r: %s", session.id, auth.method, auth.username, reason
        )
        raise Reject(535, _REFUSED, enhanced="5.7.8")

    async def verify(self, username: str, password: str) -> bool:
        """Whether ``password`` is ``username``'s: the check of :meth:`on_auth` for other
        front ends (the operations console's HTTP Basic authentication)."""
        loop = asyncio.get_running_loop()
        async with self._slots:
            known, valid = await loop.run_in_executor(None, self._check, username, password)
        return known and valid

    # --- in a worker thread -------------------------------------------------------------------

    def _check(self, username: str, password: str) -> tuple[bool, bool]:
        """(the user exists, the password is right). Blocking: argon2."""
        self._maybe_reload()
        table = self._table
        stored = table.users.get(username)
        # The same work either way: an unknown user is checked against the dummy hash.
        valid = self._verify(stored if stored is not None else table.dummy, password)
        if stored is None:
            return False, False
        if valid and self.rehash and self._needs_rehash(stored):
            self._rehash(username, stored, password)
        return True, valid

    def _verify(self, hashed: str, password: str) -> bool:
        try:
            return self.hasher.verify(hashed, password)
        except Argon2Error:  # mismatch, or a hash argon2 cannot use
            return False

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        with self._reload_lock:
            if now < self._next_check:
                return  # another thread looked while this one waited
            self._next_check = now + self.check_interval
            signature = _signature(self.path)
            if signature == self._seen:
                return
            # Remembered even when loading fails: the error is logged once per change of
            # the file, not once per attempt.
            self._seen = signature
            try:
                table = self._load(signature)
            except UsersFileError as exc:
                log.error("%s; keeping the %d users loaded before", exc, len(self._table.users))
                return
            self._table = table
            log.info("users file %s reloaded: %d users", self.path, len(table.users))

    def _load(self, signature: tuple[int, int, int, int] | None) -> _Table:
        users = read_document(self.path).users()
        counts = collections.Counter(_parameters_key(extract_parameters(h)) for h in users.values())
        if counts:
            key = counts.most_common(1)[0][0]
            parameters = next(
                p for h in users.values() if _parameters_key(p := extract_parameters(h)) == key
            )
        else:
            parameters = _hasher_parameters(self.hasher)
            key = _parameters_key(parameters)
        dummy = self._dummies.get(key)
        if dummy is None:
            try:
                dummy = PasswordHasher.from_parameters(parameters).hash(secrets.token_bytes(32))
            except Argon2Error as exc:
                raise UsersFileError(
                    f"users file {self.path}: unusable argon2 parameters: {exc}"
                ) from None
            self._dummies[key] = dummy
        return _Table(signature, users, dummy)

    def _needs_rehash(self, stored: str) -> bool:
        try:
            return self.hasher.check_needs_rehash(stored)
        except InvalidHashError:
            return False

    def _rehash(self, username: str, stored: str, password: str) -> None:
        """Replace ``username``'s hash with one made by ``self.hasher``, if safe."""
        path = real_path(self.path)
        try:
            if os.stat(path).st_uid != os.geteuid():
                # Rewriting would hand the file to another owner; leave it alone.
                log.info("users file %s is not ours to rewrite: not rehashing", path)
                self.rehash = False
                return
            with locked_directory(path):
                doc = read_document(path)
                if username not in doc.index or doc.hash_of(username) != stored:
                    return  # changed since it was loaded (or rehashed already): leave it
                doc.set(username, self.hasher.hash(password))
                write_document(path, doc)
        except (OSError, UsersFileError) as exc:
            log.warning("users file %s: cannot rehash (%s); leaving hashes as they are", path, exc)
            self.rehash = False
            return
        log.info("users file %s: rehashed %r with the current argon2 parameters", path, username)


__all__ = [
    "UsersDocument",
    "UsersFile",
    "UsersFileError",
    "check_hash",
    "check_username",
    "locked_directory",
    "read_document",
    "real_path",
    "write_document",
]
