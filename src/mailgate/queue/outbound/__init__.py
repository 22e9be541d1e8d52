"""Outbound delivery: hand queued messages to other servers (issue 12).

The queue's workers call :meth:`OutboundEngine.deliver` with a :class:`DeliveryRequest`
(one message, one destination, many recipients) and record the :class:`DeliveryResult`:
one :class:`RecipientResult` per recipient, delivered, deferred or failed, with the reply,
the remote MTA and the TLS of the session, enough for the delivery history and a DSN.
"""

from .engine import DestinationStatus, OutboundEngine
from .model import (
    DeliveryRequest,
    DeliveryResult,
    Destination,
    Forward,
    Outcome,
    Recipient,
    RecipientResult,
    Relay,
    RemoteMTA,
    Reply,
    TLSInfo,
)
from .options import TLS_POLICIES, OutboundOptions, TLSPolicy

__all__ = [
    "TLS_POLICIES",
    "DeliveryRequest",
    "DeliveryResult",
    "Destination",
    "DestinationStatus",
    "Forward",
    "OutboundEngine",
    "OutboundOptions",
    "Outcome",
    "Recipient",
    "RecipientResult",
    "Relay",
    "RemoteMTA",
    "Reply",
    "TLSInfo",
    "TLSPolicy",
]
