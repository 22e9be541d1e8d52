"""Sans-IO SMTP/LMTP: bytes in, events and replies out. No sockets, no asyncio, no policy.

Start with :class:`ServerConnection`; see :mod:`mailgate.protocol.rules` for the rules
and :mod:`mailgate.protocol.events` for what comes out.
"""

from . import connection
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

#: Whether this is the optional mypyc-compiled build (MAILGATE_COMPILE=1, see setup.py):
#: then the connection is an extension module, not a .py file.
COMPILED: bool = not connection.__file__.endswith(".py")

__all__ = [
    "COMPILED",
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
