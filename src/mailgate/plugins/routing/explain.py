"""``mailgate routes test``: which rule routes each recipient, and why, in words.

The command line itself belongs to the CLI; :func:`routes_test` does the work and gives
back the text and the exit status::

    $ mailgate routes test --config mailgate.toml --sender a@corp.example bob@partner.example
    sender <a@corp.example>, no client address, not authenticated
    bob@partner.example: rule #2 "partners" -> forward to smtp://mx.partner.example:25
        matched by recipients '*@partner.example', senders '*@corp.example'
        rule #1 "block" was passed over: the sender is not in senders
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path

from mailgate.plugins.policy import IPAddress, client_address
from mailgate.plugins.routing.patterns import AddressSet, split_address
from mailgate.plugins.routing.rules import Action, RouteDecision, RoutesConfigError, RouteTable
from mailgate.protocol import AddressError
from mailgate.protocol.address import parse_forward_path, parse_reverse_path

EXIT_OK = 0
#: A recipient, sender or client address given on the command line is not one.
EXIT_BAD_INPUT = 1
#: The configuration file cannot be read or its routes are wrong (mailgate's usual 2).
EXIT_CONFIG = 2


def load_routes(config_path: str | Path) -> RouteTable:
    """The ``[[routes]]`` of a TOML configuration file (an empty table when it has none).
    Raises RoutesConfigError for an unreadable file or a wrong rule."""
    path = Path(config_path)
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise RoutesConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RoutesConfigError(f"{path}: not valid TOML: {exc}") from None
    return RouteTable.from_document(document, str(path), path.parent)


def describe(decision: RouteDecision) -> str:
    """The action of a decision in words: ``forward to smtp://host:25``."""
    if decision.action is Action.RELAY:
        tls = f" (TLS policy {decision.tls})" if decision.tls else ""
        return f"relay to the MX of {decision.domain}{tls}"
    if decision.action is Action.FORWARD:
        assert decision.forward is not None
        return f"forward to {decision.forward.url}"
    if decision.action is Action.REJECT:
        return f"reject at RCPT with {decision.destination}"
    return "deliver locally (the configured deliveries)"


def explain(
    table: RouteTable,
    recipient: str,
    sender: str | None = None,
    client: str | IPAddress | None = None,
    authenticated: bool = False,
) -> str:
    """The decision for one recipient, the patterns that made the rule match, and the
    earlier rules that named the recipient but were passed over (with the reason)."""
    decision = table.match(recipient, sender, client, authenticated)
    route = decision.route
    local, domain = split_address(recipient)
    shown = recipient.strip().strip("<>")
    if route is None:
        if not table:
            why = "no [[routes]]"
        elif not domain:
            why = "an address without a domain is always local"
        else:
            why = "no rule matched"
        return f"{shown}: {why} -> {describe(decision)}"
    lines = [f"{shown}: rule {route.label} -> {describe(decision)}"]
    if route.description:
        lines.append(f"    {route.description}")
    parsed_sender = _parsed_sender(sender)
    address = _client(client)
    reasons = []
    found = AddressSet(route.recipients).matching(local, domain)
    assert found is not None  # the rule matched, so one of its recipient patterns did
    reasons.append(f"recipients {found.text!r}")
    if route.senders is not None and parsed_sender is not None:
        pattern = AddressSet(route.senders).matching(*parsed_sender)
        if pattern is not None:
            reasons.append(f"senders {pattern.text!r}")
    if route.clients is not None and address is not None:
        network = next(n for n in route.clients if address in n)
        reasons.append(f"clients {str(network)!r}")
    if route.authenticated is not None:
        reasons.append(f"authenticated = {'true' if route.authenticated else 'false'}")
    lines.append("    matched by " + ", ".join(reasons))
    for earlier in table.routes[: route.index - 1]:
        if AddressSet(earlier.recipients).matching(local, domain) is None:
            continue
        why_not = earlier.mismatch(parsed_sender, address, authenticated)
        if why_not is not None:
            lines.append(f"    rule {earlier.label} was passed over: {why_not}")
    return "\n".join(lines)


def routes_test(
    config_path: str | Path,
    recipients: Sequence[str],
    sender: str | None = None,
    client: str | None = None,
    authenticated: bool = False,
) -> tuple[str, int]:
    """What ``mailgate routes test --config FILE [--sender S] [--client IP]
    [--authenticated] RECIPIENT...`` prints, and its exit status: 0 when every recipient
    was routed (a reject rule is an answer too), 1 when a recipient, the sender or the
    client address is not one, 2 when the file or its routes are wrong."""
    try:
        table = load_routes(config_path)
    except RoutesConfigError as exc:
        return f"mailgate: error: {exc}", EXIT_CONFIG
    problems = []
    if sender is not None and sender.strip() not in ("", "<>"):
        try:
            parse_reverse_path(f"<{sender.strip().strip('<>')}>", smtputf8=True)
        except AddressError as exc:
            problems.append(f"--sender {sender!r} is not an address: {exc}")
    if client is not None and client_address(client) is None:
        problems.append(f"--client {client!r} is not an IP address")
    lines = [_context(sender, client, authenticated)]
    for recipient in recipients:
        try:
            parse_forward_path(f"<{recipient.strip().strip('<>')}>", smtputf8=True)
        except AddressError as exc:
            problems.append(f"{recipient!r} is not an address: {exc}")
            continue
        if not problems:
            lines.append(explain(table, recipient, sender, client, authenticated))
    if not recipients:
        problems.append("no recipient given")
    if problems:
        return "\n".join(f"mailgate: error: {p}" for p in problems), EXIT_BAD_INPUT
    return "\n".join(lines), EXIT_OK


def _context(sender: str | None, client: str | None, authenticated: bool) -> str:
    if sender is None:
        who = "no sender given (rules with senders do not match)"
    elif sender.strip() in ("", "<>"):
        who = "sender <> (the null sender)"
    else:
        who = f"sender <{sender.strip().strip('<>')}>"
    where = f"client {client}" if client else "no client address (rules with clients do not match)"
    auth = "authenticated" if authenticated else "not authenticated"
    return f"{who}, {where}, {auth}"


def _parsed_sender(sender: str | None) -> tuple[str, str] | None:
    if sender is None:
        return None
    if sender.strip() in ("", "<>"):
        return ("", "")
    return split_address(sender)


def _client(client: str | IPAddress | None) -> IPAddress | None:
    return client_address(str(client)) if client is not None else None


__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_CONFIG",
    "EXIT_OK",
    "describe",
    "explain",
    "load_routes",
    "routes_test",
]
