"""Sans-IO SMTP/LMTP: bytes in, events and replies out. No sockets, no asyncio, no policy.

Start with :class:`ServerConnection`; see :mod:`mailgate.protocol.rules` for the rules
and :mod:`mailgate.protocol.events` for what comes out.
"""

from .address import Address, AddressError
from .config import BareNewline, ProtocolConfig
from .connection import ProtocolError, ServerConnection
from .events import (
    NEED_DATA,
    PAUSED,
    AuthCredentials,
    CommandRejected,
    ConnectionClosed,
    DataChunk,
    DataComplete,
    DataDiscarded,
    DataStart,
    DiscardReason,
    Event,
    Greeting,
    Hello,
    Limit,
    LimitExceeded,
    MailFrom,
    PolicyPoint,
    RcptTo,
    StartTLS,
    TransactionReset,
    Verify,
    Xclient,
    Xforward,
)
from .persona import REPLY_NAMES, Persona, PersonaError
from .replies import Reply
from .rules import RULES, State

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "REPLY_NAMES",
    "RULES",
    "Address",
    "AddressError",
    "AuthCredentials",
    "BareNewline",
    "CommandRejected",
    "ConnectionClosed",
    "DataChunk",
    "DataComplete",
    "DataDiscarded",
    "DataStart",
    "DiscardReason",
    "Event",
    "Greeting",
    "Hello",
    "Limit",
    "LimitExceeded",
    "MailFrom",
    "Persona",
    "PersonaError",
    "PolicyPoint",
    "ProtocolConfig",
    "ProtocolError",
    "RcptTo",
    "Reply",
    "ServerConnection",
    "StartTLS",
    "State",
    "TransactionReset",
    "Verify",
    "Xclient",
    "Xforward",
]
