"""The routing rules in a running server: refuse at RCPT what a reject rule refuses, and
remember where every other recipient goes, for the message stage (the queue).

Relay control runs before (it decides who may relay at all); this plugin decides where
accepted mail goes. The decisions of the transaction in progress are kept in
``session.notes["routing.decisions"]`` (recipient text -> :class:`RouteDecision`); read
them with :meth:`RoutingPlugin.decisions` or :meth:`RoutingPlugin.destinations`, which
also route a recipient that an earlier step accepted before this one could see it.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from mailgate.hooks import Address, Envelope, Reject, Session, TempFail
from mailgate.plugins.policy import PolicyEnv, decide
from mailgate.plugins.routing.rules import Action, RouteDecision, RouteTable

#: session.notes key: {recipient text: RouteDecision} of the transaction in progress.
DECISIONS_NOTE: Final = "routing.decisions"


class RoutingPlugin:
    """Applies a :class:`RouteTable` at RCPT."""

    name = "routing"

    def __init__(self, table: RouteTable) -> None:
        self.table = table

    def route(self, session: Session, envelope: Envelope, address: Address) -> RouteDecision:
        """The decision for ``address`` in this session and transaction."""
        sender = envelope.sender if envelope.mail_from is not None else None
        return self.table.match(address, sender, session.peer_host, session.authenticated)

    async def on_mail(self, session: Session, envelope: Envelope, address: Address) -> None:
        # A new transaction: the decisions of the last one are gone with its recipients.
        session.notes[DECISIONS_NOTE] = {}

    async def on_rcpt(self, session: Session, envelope: Envelope, address: Address) -> None:
        decision = self.route(session, envelope, address)
        rule = decision.route
        if decision.action is Action.REJECT:
            reply = decision.reply
            assert reply is not None and rule is not None
            verdict = "reject" if reply.permanent else "tempfail"
            decide(
                session,
                "routing",
                verdict,
                f"{address}: rule {rule.label}: {reply}",
                rcpt=str(address),
                rule=rule.index,
            )
            refusal = Reject if reply.permanent else TempFail
            raise refusal(reply.code, reply.text, enhanced=reply.enhanced)
        decide(
            session,
            "routing",
            decision.action.value,
            f"{address}: {'rule ' + rule.label if rule else 'no rule'}: {decision.destination}",
            level=logging.DEBUG,
            rcpt=str(address),
            rule=decision.index,
            destination=decision.destination,
        )
        session.notes.setdefault(DECISIONS_NOTE, {})[str(address)] = decision

    async def on_reset(self, session: Session, envelope: Envelope) -> None:
        session.notes.pop(DECISIONS_NOTE, None)

    def decisions(
        self, session: Session, envelope: Envelope
    ) -> list[tuple[Address, RouteDecision]]:
        """Each accepted recipient of ``envelope`` with its decision, in RCPT order."""
        recorded: dict[str, RouteDecision] = session.notes.get(DECISIONS_NOTE, {})
        return [
            (rcpt, recorded.get(str(rcpt)) or self.route(session, envelope, rcpt))
            for rcpt in envelope.rcpt_tos
        ]

    def destinations(self, session: Session, envelope: Envelope) -> dict[str, list[Address]]:
        """The accepted recipients grouped by destination key (``deliver``,
        ``relay:<domain>``, ``forward:<url>``), in RCPT order: one delivery transaction
        per key. A reject rule's reply (``550 5.7.1 ...``) appears as a key only for a
        recipient that an earlier step accepted before this plugin could refuse it: the
        mail was accepted, so it is the caller's to bounce with that reply, not to drop."""
        groups: dict[str, list[Address]] = {}
        for rcpt, decision in self.decisions(session, envelope):
            groups.setdefault(decision.destination, []).append(rcpt)
        return groups


def plugins_from_options(env: PolicyEnv) -> list[Any]:
    """The routing plugin when the configuration has ``[[routes]]``; none otherwise (every
    recipient is then delivered locally, as before routing)."""
    table = RouteTable.from_sections(env.sections("routes"))
    return [RoutingPlugin(table)] if table else []


__all__ = ["DECISIONS_NOTE", "RoutingPlugin", "plugins_from_options"]
