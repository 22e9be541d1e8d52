"""Outbound delivery: hand queued messages to other servers (issue 12).

The queue's workers call :meth:`OutboundEngine.deliver` with a :class:`DeliveryRequest`
(one message, one destination, many recipients) and record the :class:`DeliveryResult`:
one :class:`RecipientResult` per recipient, delivered, deferred or failed, with the reply,
the remote MTA and the TLS of the session, enough for the delivery history and a DSN::

    engine = OutboundEngine(
        OutboundOptions(helo="mx.example.org"), resolver=Resolver(["127.0.0.1:53"])
    )
    result = await engine.deliver(
        DeliveryRequest(
            queue_id="4XyZ",
            sender="alice@example.org",
            body_path=Path("/var/spool/mailgate/4XyZ"),
            size=1234,
            recipients=(Recipient("bob@example.net", notify="FAILURE"),),
            destination=Relay("example.net"),
            attempt=1,
        )
    )
    for outcome in result.recipients:  # DELIVERED / DEFERRED / FAILED, status, reply...
        ...
    await engine.aclose()
"""

from .engine import DestinationStatus, OutboundEngine
from .model import (
    DeliveryRequest,
    DeliveryResult,
    Destination,
    Forward,
    Outcome,
    PolicyInfo,
    Recipient,
    RecipientResult,
    Relay,
    RemoteMTA,
    Reply,
    TLSInfo,
    tls_summary,
)
from .options import TLS_POLICIES, OutboundOptions, TLSPolicy
from .tlspolicy import (
    TLS_LEVELS,
    CAMatcher,
    CertificateCheck,
    CertificateMatcher,
    DANEProvider,
    DestinationPolicy,
    TLSLevel,
    TLSRequirement,
)

__all__ = [
    "TLS_LEVELS",
    "TLS_POLICIES",
    "CAMatcher",
    "CertificateCheck",
    "CertificateMatcher",
    "DANEProvider",
    "DeliveryRequest",
    "DeliveryResult",
    "Destination",
    "DestinationPolicy",
    "DestinationStatus",
    "Forward",
    "OutboundEngine",
    "OutboundOptions",
    "Outcome",
    "PolicyInfo",
    "Recipient",
    "RecipientResult",
    "Relay",
    "RemoteMTA",
    "Reply",
    "TLSInfo",
    "TLSLevel",
    "TLSPolicy",
    "TLSRequirement",
    "tls_summary",
]
