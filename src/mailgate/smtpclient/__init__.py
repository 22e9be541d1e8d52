"""The SMTP/LMTP client pieces mailgate's senders share, on top of aiosmtplib.

Used by :mod:`mailgate.delivery.forward` (forward each message before the 250) and
:mod:`mailgate.queue.outbound` (deliver queued messages). Each module has one job:

- :mod:`.target`: smarthost URLs (``smtp://``, ``smtps://``, ``lmtp://``) and their redaction;
- :mod:`.commands`: LHLO for LMTP through aiosmtplib, and a QUIT that never raises;
- :mod:`.params`: the MAIL and RCPT parameters passed on (SIZE, BODY, SMTPUTF8, DSN);
- :mod:`.body`: the message streamed from a file on the borrowed transport, with
  dot-stuffing, flow control and every reply collected (one per recipient for LMTP);
- :mod:`.replies`: a server reply's enhanced code and cleaned text;
- :mod:`.tls`: the opportunistic TLS context and the TLS failure behind an exception.

It knows nothing of hooks, sessions or queues: callers pass plain strings and map the
replies to their own answers.
"""

from .body import (
    CHUNK_SIZE,
    BodyProtocol,
    MessageFile,
    borrowed_transport,
    dot_stuff,
    send_message,
)
from .commands import lhlo, quit_politely
from .params import mail_params, rcpt_params
from .replies import split_reply
from .target import SmartHost, display_host, parse_url, redact
from .tls import opportunistic_context, ssl_error

__all__ = [
    "CHUNK_SIZE",
    "BodyProtocol",
    "MessageFile",
    "SmartHost",
    "borrowed_transport",
    "display_host",
    "dot_stuff",
    "lhlo",
    "mail_params",
    "opportunistic_context",
    "parse_url",
    "quit_politely",
    "rcpt_params",
    "redact",
    "send_message",
    "split_reply",
    "ssl_error",
]
