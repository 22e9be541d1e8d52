"""How the server presents itself: every reply text, the banner, the EHLO/HELO greeting,
the EHLO keyword order and HELP, as one immutable value kept in ``ProtocolConfig.persona``.

The default :class:`Persona` gives mailgate's own texts. A persona changes only how things
*look*: what the engine does (and so what it advertises) stays decided by the
:class:`~mailgate.protocol.config.ProtocolConfig`. A persona can hide an extension (it is
then left out of EHLO and refused as if mailgate did not have it) but never add one.

Reply names
-----------
A name is the lower-case name of a constant in :mod:`mailgate.protocol.replies`;
:data:`REPLY_NAMES` lists them all. An override is a :class:`~mailgate.protocol.replies.Reply`
(code, enhanced code, lines) or a plain ``str`` (new text, the default's codes; ``\\n``
separates lines). Texts follow RFC 5321's ``textstring`` (printable ASCII and TAB) and may
use the placeholders listed for their name: ``{hostname}`` (the server's name) everywhere,
and the ones below. Write ``{{`` and ``}}`` for literal braces. An override keeps the
reply's class: a positive reply stays in its 2xx/3xx class (``start_data`` must be 354,
``ready_for_tls`` 220), a refusal stays a 4xx or 5xx.

Values put into placeholders are cleaned: control characters become ``?``, ``None`` the
empty string. Values that are the client's own words -- ``{verb}`` and ``{command}`` of an
unknown command, ``{mechanism}``, ``{parameter}``, ``{keyword}``, ETRN's ``{domain}``,
VRFY's ``{address}`` -- are made safe like the echo placeholders below (printable ASCII).

Echoing the client's words (products repeat what the client wrote: Exim's ``501
<a@b: '>' missing at end of address``, Sendmail's ``a@b... Sender ok``): these
placeholders are filled from the command line being answered, made safe by :func:`echo`
(printable ASCII only, anything else becomes ``?``; at most :data:`ECHO_LIMIT`
characters, longer ones cut and ending in ``...``; so never a CR or LF):

- ``{argument}``: what followed the verb, spaces around it stripped (for MAIL and RCPT
  what followed ``FROM:``/``TO:``; for a line of an AUTH exchange, the line). Valid in
  every reply sent in answer to a command (all names but :data:`NOT_ANSWERS`).
- ``{path}`` and ``{parameters}``: MAIL/RCPT's path exactly as written (``<a@b>``,
  ``a@b``, or all of an unterminated ``<a@b``) and the parameter text after it. Valid in
  the replies only MAIL and RCPT get (:data:`ENVELOPE_REPLIES`).
- ``{response}``: AUTH's initial response, or the line of the AUTH exchange. Valid in
  the AUTH replies (:data:`AUTH_REPLIES`).
- ``{local_part_read}``: the start of the path's local part up to the first character no
  RFC 822 word may hold (a space, a comma...): what a parser reading words and dots had
  read when it stopped (Exim's ``"@" or "." expected after "a"`` for ``<a b@c>``). Valid
  in :data:`LOCAL_PART_REPLIES`.

=========================  ================================================  ===================
name                       sent when                                         placeholders
=========================  ================================================  ===================
ok                         XFORWARD accepted                                 -
sender_ok                  MAIL accepted                                     {address} (sender,
                                                                             empty for ``<>``)
recipient_ok               RCPT accepted                                     {address}
message_accepted           end of DATA/BDAT, no queue id known               -
message_queued             end of DATA with a queue id (used by servers      {queue_id}
                           through :meth:`Persona.format`)
bdat_chunk_ok              a BDAT chunk that is not the last one             {size} (octets)
reset_ok                   RSET                                              -
noop_ok                    NOOP                                              -
start_data                 DATA accepted (must stay 354)                     -
bye                        QUIT                                              -
ready_for_tls              STARTTLS accepted (must stay 220)                 -
auth_ok                    AUTH succeeded                                    -
vrfy_default               VRFY with no policy answer                        {address} (argument)
expn_default               EXPN with no policy answer                        {address} (argument)
help                       HELP (see also ``Persona.help``)                  {commands},
                                                                             {software}
unknown_command            unknown verb, or a hidden extension's verb        {verb}, {command}
                                                                             (the line, cut to
                                                                             200 characters)
invalid_utf8               a command line that is not UTF-8                  -
not_implemented            a verb switched off in the config, or one in      {verb}, {command}
                           behaviour ``unimplemented_commands``              (the line)
line_too_long              a command line over the limit                     {client_ip}
auth_line_too_long         an AUTH exchange line over the limit              -
control_characters         control characters in a command line              -
argument_not_allowed       an argument to RSET, DATA, QUIT...                {verb}
argument_required          no argument to HELO, MAIL, VRFY...                {verb}
hello_syntax               HELO/EHLO/LHLO with more than a name              {verb}
mail_syntax                MAIL without ``FROM:``                            {word} (the first
                                                                             word, up to a
                                                                             ``:`` or space)
rcpt_syntax                RCPT without ``TO:``                              {word}
bdat_syntax                BDAT with a bad size or last word                 -
auth_syntax                AUTH with more than two words                     -
bad_sender_address         MAIL path refused by the parser [*]_              {detail}
bad_recipient_address      RCPT path refused by the parser [*]_              {detail}
parameter_syntax           malformed MAIL/RCPT parameter (501) [*]_          {detail}, {parameter}
bad_parameter              refused MAIL/RCPT parameter (555) [*]_            {detail}, {parameter}
unknown_parameter          a parameter unknown or not offered [*]_ [f]_      {detail}, {parameter},
                                                                             {keyword}
auth_malformed             an undecodable SASL response [*]_                 {detail}
smtputf8_required          a UTF-8 address without SMTPUTF8                  -
bad_sequence               a command out of sequence (other cases)           -
need_hello                 a command before HELO/EHLO                        -
need_mail                  RCPT/DATA before MAIL                             -
need_rcpt                  DATA before RCPT                                  {verb}
sender_already_specified   MAIL inside a transaction                         -
data_after_bdat            DATA between BDAT chunks                          -
not_in_transaction         STARTTLS/AUTH/XCLIENT/XFORWARD in a transaction   {verb}
only_quit                  anything but QUIT after a 554 greeting            -
binarymime_needs_bdat      DATA after ``BODY=BINARYMIME``                    -
tls_already_active         STARTTLS inside TLS                               -
auth_already               AUTH when authenticated                           -
auth_unknown_mechanism     AUTH with a mechanism not offered                 {mechanism}
auth_requires_tls          AUTH before TLS when TLS is required              -
auth_failed                AUTH refused (servers answer it)                  -
auth_cancelled             ``*`` during an AUTH exchange                     -
auth_bad_base64            an AUTH response that is not base64               -
too_many_recipients        RCPT over ``max_recipients``                      {max_recipients}
message_too_big            SIZE= over the limit, or too much data            {max_size}
bare_newline               bare CR/LF before "." in DATA (policy REJECT)     -
bare_newline_strict        bare CR/LF in DATA (policy STRICT)                -
data_line_too_long         a DATA line over the limit                        -
too_many_errors            too many unknown/bad commands or AUTH failures    -
shutting_down              the server closes the session (shutdown)          -
idle_timeout               the server closes an idle session                 -
syntax_error               not sent by the engine (for servers, plugins)     -
bad_address                not sent by the engine (for servers, plugins)     -
empty_line                 an empty command line [f]_                        {verb} (empty),
                                                                             {command} (its
                                                                             blanks)
hello_argument_required    HELO/EHLO/LHLO without an argument [f]_           {verb}
mail_argument_required     MAIL without an argument [f]_                     {verb}
rcpt_argument_required     RCPT without an argument [f]_                     {verb}
vrfy_argument_required     VRFY/EXPN without an argument [f]_                {verb}
expn_argument_required     EXPN without an argument [f]_                     {verb}
auth_argument_required     AUTH without a mechanism [f]_                     {verb}
data_need_mail             DATA/BDAT before MAIL [f]_                        {verb}
auth_bad_base64_initial    an AUTH initial response that is not base64 [f]_  -
size_syntax                MAIL with a SIZE= that is not a number [f]_       {parameter}, {detail}
xclient_not_allowed        XCLIENT/XFORWARD from a client not trusted [f]_   {verb}, {command}
forbidden_command          a forbidden or bogus command (behaviour           {verb}
                           ``forbidden_commands``); then closes
etrn_in_transaction        ETRN inside a mail transaction [f]_               {verb}
etrn_argument_required     ETRN without a domain (behaviour ``etrn``)        -
etrn_syntax                ETRN with a domain that is not one                {domain}
etrn_refused               ETRN for a domain (nothing is ever flushed)       {domain}
etrn_started               ETRN for a domain (behaviour ``etrn_accepted``)   {domain}
verbose_ok                 VERB (offered with the VERB keyword)              -
domain_literal             MAIL/RCPT with a domain literal (behaviour        {address}
                           ``domain_literals = false``)
vrfy_unqualified           VRFY of a name without ``@domain`` [f]_            {address}
vrfy_need_hello            VRFY/EXPN before HELO (``verify_needs_hello``)    -
                           [f]_
too_many_unknown_commands  the unknown command over                          -
                           ``unknown_command_limit`` (instead of its reply;
                           the connection closes) [f]_
too_many_clients           server: over its connection limit (max_clients)   {client_ip}
too_many_from_ip           server: over max_clients_per_ip                   {client_ip}
proxy_required             server: a client not behind the PROXY peers       {client_ip}
proxy_refused              server: a bad or missing PROXY header             {client_ip}
early_talker               server: a client that talks before the banner     {client_ip}
synchronization_error      input behind a command that must end a pipelined  -
                           group (``sync_check``, ``sync_until_pipelining``);
                           then closes (or only QUIT: ``sync_error_refuses``)
tls_in_transaction         STARTTLS in a mail transaction [f]_               {verb}
help_unknown_topic         HELP with a topic not in ``help_topics``          {topic} (lower
                                                                             case, its first
                                                                             10 characters)
prdr_sender_ok             MAIL with PRDR accepted [f]_                      {address}
prdr_start                 after a PRDR message (must stay 353)              -
prdr_recipient_ok          a PRDR message's reply for one recipient          {address}
hello_bad_name             a HELO name with characters a host name has not   {verb}
                           (``hello_name_check``, ``hello_name_characters``,
                           ``hello_name_max_length``) [f]_
nul_characters             a NUL byte in a command line (``nul_first``) [f]_  -
rcpt_errors_repeated       lines before DATA/BDAT's 503 when every RCPT got  {rcpt_error} (the
                           the same refusal (``repeat_rcpt_error``)          refusal: its text,
                                                                             code first if the
                                                                             engine made it)
need_rcpt_after_rcpt       DATA/BDAT's 503 right after a refused RCPT in a   {verb}
                           pipelining session (``repeat_rcpt_error``) [f]_
bdat_needs_rset            a command in a BDAT transfer broken off           -
                           (``bdat_needs_rset``)
bdat_abandoned             after the QUIT that ends such a transfer          -
bdat_last_chunk_ok         lines before the final reply of BDAT LAST; sent   {size}, {total}
                           only when a persona gives it
address_unterminated       MAIL/RCPT path without its ``>`` [*]_ [k]_        {detail}
address_local_part         a path's local part refused [*]_ [k]_             {detail}
address_domain             a path's domain refused [*]_ [k]_                 {detail}
address_too_long           a path, local part or domain too long [*]_ [k]_   {detail}
null_recipient             ``RCPT TO:<>`` [*]_ [k]_                          {detail}
sender_unqualified         MAIL path without ``@domain`` [*]_ [k]_           {detail}
recipient_unqualified      RCPT path without ``@domain`` [*]_ [k]_           {detail}
mail_parameter_not_offered a MAIL parameter mailgate knows whose extension   {detail}, {parameter},
                           this session did not offer [*]_ [f]_              {keyword}
=========================  ================================================  ===================

.. [k] The address parser's refusals by kind: a persona that does not give one gets
   ``bad_sender_address`` or ``bad_recipient_address`` for it (by the command).

.. [f] Names for one situation of a more general name (:data:`FALLBACKS`): when a
   persona does not override one, it gets the general name's reply (``empty_line`` is
   ``unknown_command`` unless given, ``data_need_mail`` is ``need_mail``...).

.. [*] Pass-through replies: by default the engine sends the parser's own, more specific
   reply (e.g. ``555 5.5.4 Unknown parameter FOO``). An override replaces it; ``{detail}``
   is the parser's text. A ``str`` override keeps the parser's code and enhanced code.

XCLIENT/XFORWARD syntax errors (trusted peers only) and SASL challenges keep their texts.

A :class:`Persona` with a bad override (unknown name, unknown placeholder, malformed text,
a code of the wrong class) raises :class:`PersonaError` (a ``ValueError``) naming it.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from . import replies
from .address import closing_bracket
from .behaviour import DEFAULT_BEHAVIOUR, Behaviour
from .replies import Reply, ReplyError


class PersonaError(ValueError):
    """A Persona built with values that cannot work; the message names the reply."""


def _names() -> dict[str, Reply]:
    return {
        name.lower(): value
        for name, value in vars(replies).items()
        if isinstance(value, Reply) and name.isupper()
    }


_DEFAULTS: Mapping[str, Reply] = MappingProxyType(_names())

#: Every reply name a persona may override (lower-case names of the replies.py constants).
REPLY_NAMES: frozenset[str] = frozenset(_DEFAULTS)

#: Default reply object (by identity) -> its name: a caller that passes the standard
#: constant (``replies.AUTH_FAILED``) gets the persona's version of it.
CONSTANT_NAMES: Mapping[int, str] = MappingProxyType({id(v): k for k, v in _DEFAULTS.items()})


def _allowed(*extra: str) -> frozenset[str]:
    return frozenset(("hostname", *extra))


_PLACEHOLDERS_BY_NAME: dict[str, frozenset[str]] = {name: _allowed() for name in REPLY_NAMES}
_PLACEHOLDERS_BY_NAME.update(
    {
        "sender_ok": _allowed("address"),
        "recipient_ok": _allowed("address"),
        "message_queued": _allowed("queue_id"),
        "bdat_chunk_ok": _allowed("size"),
        "vrfy_default": _allowed("address"),
        "expn_default": _allowed("address"),
        "help": _allowed("commands", "software"),
        "unknown_command": _allowed("verb", "command"),
        "not_implemented": _allowed("verb", "command"),
        "argument_not_allowed": _allowed("verb"),
        "argument_required": _allowed("verb"),
        "hello_syntax": _allowed("verb"),
        "not_in_transaction": _allowed("verb"),
        "bad_sender_address": _allowed("detail"),
        "bad_recipient_address": _allowed("detail"),
        "parameter_syntax": _allowed("detail", "parameter"),
        "bad_parameter": _allowed("detail", "parameter"),
        "unknown_parameter": _allowed("detail", "parameter", "keyword"),
        "size_syntax": _allowed("detail", "parameter"),
        "xclient_not_allowed": _allowed("verb", "command"),
        "line_too_long": _allowed("client_ip"),
        # The word Sendmail could not scan ("TO" of "MAIL TO:<a@b>"), echoed safely.
        "mail_syntax": _allowed("word"),
        "rcpt_syntax": _allowed("word"),
        "tls_in_transaction": _allowed("verb"),
        "help_unknown_topic": _allowed("topic"),
        "forbidden_command": _allowed("verb"),
        "auth_malformed": _allowed("detail"),
        "too_many_recipients": _allowed("max_recipients"),
        "message_too_big": _allowed("max_size"),
        "hello_argument_required": _allowed("verb"),
        "mail_argument_required": _allowed("verb"),
        "rcpt_argument_required": _allowed("verb"),
        "vrfy_argument_required": _allowed("verb"),
        "expn_argument_required": _allowed("verb"),
        "auth_argument_required": _allowed("verb"),
        "data_need_mail": _allowed("verb"),
        "etrn_in_transaction": _allowed("verb"),
        "etrn_syntax": _allowed("domain"),
        "etrn_refused": _allowed("domain"),
        "etrn_started": _allowed("domain"),
        "domain_literal": _allowed("address"),
        "vrfy_unqualified": _allowed("address"),
        "prdr_recipient_ok": _allowed("address"),
        # The client's word, as sent (Exim and Sendmail repeat it).
        "auth_unknown_mechanism": _allowed("mechanism"),
        "prdr_sender_ok": _allowed("address"),
        # The general name's placeholders, for a fallback that inherits its text.
        "empty_line": _allowed("verb", "command"),
        "too_many_clients": _allowed("client_ip"),
        "too_many_from_ip": _allowed("client_ip"),
        "proxy_required": _allowed("client_ip"),
        "proxy_refused": _allowed("client_ip"),
        "early_talker": _allowed("client_ip"),
        "need_rcpt": _allowed("verb"),
        "need_rcpt_after_rcpt": _allowed("verb"),
        "rcpt_errors_repeated": _allowed("rcpt_error"),
        "hello_bad_name": _allowed("verb"),
        "bdat_last_chunk_ok": _allowed("size", "total"),
        "address_unterminated": _allowed("detail"),
        "address_local_part": _allowed("detail"),
        "address_domain": _allowed("detail"),
        "address_too_long": _allowed("detail"),
        "null_recipient": _allowed("detail"),
        "sender_unqualified": _allowed("detail"),
        "recipient_unqualified": _allowed("detail"),
        "mail_parameter_not_offered": _allowed("detail", "parameter", "keyword"),
    }
)

#: Replies not sent in answer to a command line (outside the dialogue, on the server's
#: initiative, at the end of message data, or only by servers and plugins): no client
#: words to echo in them.
NOT_ANSWERS: frozenset[str] = frozenset(
    {
        "too_many_clients",
        "too_many_from_ip",
        "proxy_required",
        "proxy_refused",
        "early_talker",
        "shutting_down",
        "idle_timeout",
        "message_queued",
        "message_accepted",
        "prdr_start",
        "prdr_recipient_ok",
        "syntax_error",
        "bad_address",
    }
)
#: The parser's refusals of a MAIL or RCPT path and its parameters (each worded by the
#: parser unless a persona overrides it: see PASS_THROUGH).
_PATH_REFUSALS: frozenset[str] = frozenset(
    {
        "bad_sender_address",
        "bad_recipient_address",
        "parameter_syntax",
        "bad_parameter",
        "unknown_parameter",
        "address_unterminated",
        "address_local_part",
        "address_domain",
        "address_too_long",
        "null_recipient",
        "sender_unqualified",
        "recipient_unqualified",
        "mail_parameter_not_offered",
    }
)
#: Replies only ever sent in answer to MAIL or RCPT: {path} and {parameters} (the
#: client's path and parameters as written) are theirs.
ENVELOPE_REPLIES: frozenset[str] = _PATH_REFUSALS | {
    "sender_ok",
    "recipient_ok",
    "prdr_sender_ok",
    "size_syntax",
    "domain_literal",
    "smtputf8_required",
    "too_many_recipients",
    "sender_already_specified",
    "mail_syntax",
    "rcpt_syntax",
}
#: Replies to AUTH and its exchange: {response} (the client's SASL response) is theirs.
AUTH_REPLIES: frozenset[str] = frozenset(
    {
        "auth_ok",
        "auth_failed",
        "auth_malformed",
        "auth_cancelled",
        "auth_bad_base64",
        "auth_bad_base64_initial",
        "auth_unknown_mechanism",
        "auth_line_too_long",
    }
)
#: The placeholders that echo the client's own words (see :func:`echo`).
ECHO_PLACEHOLDERS = frozenset({"argument", "path", "parameters", "response", "local_part_read"})
#: Replies about a refused local part: {local_part_read} is theirs.
LOCAL_PART_REPLIES = frozenset(
    {"address_local_part", "bad_sender_address", "bad_recipient_address"}
)
for _name in REPLY_NAMES - NOT_ANSWERS:
    _PLACEHOLDERS_BY_NAME[_name] = _PLACEHOLDERS_BY_NAME[_name] | {"argument"}
for _name in ENVELOPE_REPLIES:
    _PLACEHOLDERS_BY_NAME[_name] = _PLACEHOLDERS_BY_NAME[_name] | {"path", "parameters"}
for _name in AUTH_REPLIES:
    _PLACEHOLDERS_BY_NAME[_name] = _PLACEHOLDERS_BY_NAME[_name] | {"response"}
for _name in LOCAL_PART_REPLIES:
    _PLACEHOLDERS_BY_NAME[_name] = _PLACEHOLDERS_BY_NAME[_name] | {"local_part_read"}
del _name
#: Specific name -> the general name whose reply it gets when a persona does not
#: override it (the protocol always sends the specific name).
FALLBACKS: Mapping[str, str] = MappingProxyType(
    {
        "empty_line": "unknown_command",
        "hello_argument_required": "argument_required",
        "mail_argument_required": "argument_required",
        "rcpt_argument_required": "argument_required",
        "vrfy_argument_required": "argument_required",
        "expn_argument_required": "vrfy_argument_required",
        "auth_argument_required": "argument_required",
        "data_need_mail": "need_mail",
        "auth_bad_base64_initial": "auth_bad_base64",
        "size_syntax": "bad_parameter",
        "unknown_parameter": "bad_parameter",
        "xclient_not_allowed": "not_implemented",
        "prdr_sender_ok": "sender_ok",
        "vrfy_need_hello": "need_hello",
        "vrfy_unqualified": "vrfy_default",
        "too_many_unknown_commands": "too_many_errors",
        "etrn_in_transaction": "not_in_transaction",
        "hello_bad_name": "hello_syntax",
        "tls_in_transaction": "not_in_transaction",
        "nul_characters": "control_characters",
        "need_rcpt_after_rcpt": "need_rcpt",
        "mail_parameter_not_offered": "unknown_parameter",
    }
)
#: Reply name -> the placeholders its text may use.
PLACEHOLDERS: Mapping[str, frozenset[str]] = MappingProxyType(_PLACEHOLDERS_BY_NAME)

#: The banner (220 greeting) and the HELO/EHLO/LHLO greeting line.
BANNER_PLACEHOLDERS = frozenset(
    {"hostname", "software", "protocol", "date", "date_padded", "date_gmt", "client_ip"}
)
GREETING_PLACEHOLDERS = BANNER_PLACEHOLDERS | {"helo"}

#: Names whose default is the parser's own reply (see the module docstring).
PASS_THROUGH: frozenset[str] = _PATH_REFUSALS | {"auth_malformed"}
#: AddressError.kind -> the reply name a persona may give for it (MAIL, RCPT); when it does
#: not, the role's bad_sender_address/bad_recipient_address.
ADDRESS_KIND_REPLIES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "unterminated": ("address_unterminated", "address_unterminated"),
        "local_part": ("address_local_part", "address_local_part"),
        "domain": ("address_domain", "address_domain"),
        "too_long": ("address_too_long", "address_too_long"),
        "null": ("null_recipient", "null_recipient"),
        "unqualified": ("sender_unqualified", "recipient_unqualified"),
    }
)
#: Replies the state machine recognizes by their exact code.
_EXACT_CODES = {"start_data": 354, "ready_for_tls": 220, "prdr_start": 353}
#: Replies that may be an answer or a refusal (nothing in the session depends on which).
_EITHER_CLASS = frozenset({"vrfy_unqualified"})

#: Every EHLO keyword mailgate can offer (what capability_order and hidden_capabilities
#: may name). EXPN is never advertised but can be hidden (the command becomes unknown).
KEYWORDS: frozenset[str] = frozenset(
    {
        "PIPELINING",
        "SIZE",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "BINARYMIME",
        "DSN",
        "STARTTLS",
        "REQUIRETLS",
        "AUTH",
        "XCLIENT",
        "XFORWARD",
        "VRFY",
        "EXPN",
        "HELP",
        "ETRN",
        # Opt-in: offered only by a persona that lists them in its capability order.
        "PRDR",
        "PIPECONNECT",
        "VERB",
        "DELIVERBY",
    }
)
#: Keywords mailgate offers only to a persona that lists them in ``capability_order``
#: (products that advertise them; mailgate's own look does not). EXPN, answered by
#: every look, is also listed in EHLO only by a persona that names it (Sendmail).
OPT_IN_KEYWORDS: frozenset[str] = frozenset({"PRDR", "PIPECONNECT", "VERB", "DELIVERBY"})
#: The verb each hideable keyword brings; hidden, the verb is an unknown command.
_VERB_OF = {
    "CHUNKING": "BDAT",
    "STARTTLS": "STARTTLS",
    "AUTH": "AUTH",
    "VRFY": "VRFY",
    "EXPN": "EXPN",
    "HELP": "HELP",
    "XCLIENT": "XCLIENT",
    "XFORWARD": "XFORWARD",
    "ETRN": "ETRN",
}

# RFC 5321 4.2: textstring = 1*(%d09 / %d32-126)
_TEXT = re.compile(r"[\t\x20-\x7e]*")
# What a placeholder value may not bring onto the wire: C0 and C1 controls (CR, LF...),
# DEL, and lone surrogates (which cannot be encoded).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_FORMATTER = string.Formatter()
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def local_now() -> datetime:
    """The current time in the server's local time zone (ProtocolConfig's default clock)."""
    return datetime.now().astimezone()


def format_date(moment: datetime, *, padded: bool = False, gmt: bool = False) -> str:
    """RFC 5322 date-time: ``Tue, 1 Dec 2026 10:00:00 +0000`` (``padded``: a two-digit day,
    ``Tue, 01 Dec 2026 ...``, as Exim writes it; ``gmt``: a zero offset written ``GMT``,
    as Sendmail's arpadate() does on a UTC host). A naive ``moment`` is taken as local
    time."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        moment = moment.astimezone()
    offset = moment.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    sign = "-" if minutes < 0 else "+"
    hours, mins = divmod(abs(minutes), 60)
    return (
        f"{_DAYS[moment.weekday()]}, {moment.day:0{2 if padded else 1}d} "
        f"{_MONTHS[moment.month - 1]} "
        f"{moment.year:04d} {moment.hour:02d}:{moment.minute:02d}:{moment.second:02d} "
        + ("GMT" if gmt and minutes == 0 else f"{sign}{hours:02d}{mins:02d}")
    )


class CurrentDate:
    """A ``{date}`` value that reads its clock only when a text uses it."""

    __slots__ = ("clock", "gmt", "padded")

    def __init__(
        self, clock: Callable[[], datetime], *, padded: bool = False, gmt: bool = False
    ) -> None:
        self.clock = clock
        self.padded = padded
        self.gmt = gmt

    def __str__(self) -> str:
        return format_date(self.clock(), padded=self.padded, gmt=self.gmt)


#: The longest echo of the client's words (characters); a longer one is cut and ends
#: with "...". Products echo the whole line; a bound keeps the reply within reason.
ECHO_LIMIT = 400
# Everything but printable ASCII (TAB, controls, DEL, any non-ASCII character).
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")


def echo(text: str, limit: int = ECHO_LIMIT) -> str:
    """The client's words as a reply may show them: printable ASCII only (anything else,
    CR and LF among it, becomes ``?``), at most ``limit`` characters (longer: cut, with
    ``...``). Braces are safe: values are never formatted again."""
    if len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."
    if text.isascii() and text.isprintable():
        return text
    return _NOT_PRINTABLE.sub("?", text)


def split_written_path(text: str) -> tuple[str, str]:
    """What follows ``FROM:``/``TO:`` (spaces before it stripped) as the client wrote it:
    the path (``<a@b>``, a bare ``a@b``, or all of an unterminated ``<a@b``) and the
    parameter text after it."""
    if text.startswith("<"):
        end = closing_bracket(text)
        if end < 0:
            return text, ""
        return text[: end + 1], text[end + 1 :].strip(" ")
    path, _, rest = text.partition(" ")
    return path, rest.strip(" ")


#: What a parser reading RFC 822 words and dots takes of a local part (Exim's
#: read_local_part()): atoms (no controls, spaces or specials), quoted strings, dots.
_LOCAL_PART_READ = re.compile(r'(?:"(?:[^"\\]|\\.)*"|[^\x00-\x20\x7f()<>@,;:\\".\[\]]+|\.)*')


def local_part_read(path: str) -> str:
    """The start of the path's local part up to the first character no word may hold
    (after ``<`` and a source route): ``"a"`` for ``<a b@c>``."""
    text = path[1:] if path.startswith("<") else path
    if text.startswith("@"):
        text = text.partition(":")[2]
    match = _LOCAL_PART_READ.match(text)
    return match.group() if match else ""


def echo_values(verb: str, argument: str) -> dict[str, str]:
    """The echo placeholders for a command (``verb`` upper-case, ``argument`` what
    followed it; ``verb`` empty for a line of an AUTH exchange), made safe with
    :func:`echo`: ``argument`` (after ``FROM:``/``TO:`` for MAIL/RCPT), ``path`` and
    ``parameters`` (MAIL/RCPT), ``local_part_read`` (see :func:`local_part_read`),
    ``response`` (AUTH's initial response, or the exchange line)."""
    text = argument.strip(" ")
    path = parameters = response = ""
    if verb in ("MAIL", "RCPT"):
        keyword = "FROM:" if verb == "MAIL" else "TO:"
        if text[: len(keyword)].upper() == keyword:
            text = text[len(keyword) :].lstrip(" ")
        path, parameters = split_written_path(text)
    elif verb == "AUTH":
        response = text.partition(" ")[2].strip(" ")
    elif not verb:
        response = text
    return {
        "argument": echo(text),
        "path": echo(path),
        "parameters": echo(parameters),
        "response": echo(response),
        "local_part_read": echo(local_part_read(path)) if path else "",
    }


def clean(value: object) -> str:
    """A placeholder value as it may go on the wire (no controls, so no CR or LF)."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    return _UNSAFE.sub("?", text)


def placeholders_in(text: str, allowed: Collection[str], where: str = "") -> frozenset[str]:
    """The placeholders ``text`` uses, after checking it: printable ASCII and TAB only
    (RFC 5321 ``textstring``), braces paired, every placeholder in ``allowed`` and plain
    (no format spec or conversion). PersonaError (a ValueError) otherwise, its message
    starting with ``where`` when given. The one check for every text with placeholders:
    the protocol persona's replies and greetings and the honeypot's profile texts."""
    prefix = f"{where}: " if where else ""
    if not _TEXT.fullmatch(text):
        bad = next(c for c in text if not _TEXT.fullmatch(c))
        raise PersonaError(
            f"{prefix}character {bad!r} not allowed in a reply text (printable ASCII and "
            "TAB only; separate lines with a list or '\\n')"
        )
    try:
        parsed = list(_FORMATTER.parse(text))
    except ValueError as exc:
        raise PersonaError(
            f"{prefix}{exc} in {text!r} (write '{{{{' and '}}}}' for literal braces)"
        ) from None
    found: set[str] = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in allowed:
            known = ", ".join("{" + n + "}" for n in sorted(allowed))
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"did you mean {{{close[0]}}}? " if close else ""
            raise PersonaError(
                f"{prefix}unknown placeholder {{{name}}} in {text!r} ({hint}allowed: {known})"
            )
        if spec or conversion:
            raise PersonaError(f"{prefix}placeholder {{{name}}} takes no format spec or conversion")
        found.add(name)
    return frozenset(found)


@dataclass(frozen=True, slots=True)
class _Template:
    """A reply whose text has placeholders, filled in when it is sent."""

    reply: Reply
    fields: frozenset[str]
    #: A str override of a pass-through name: the code and enhanced code of the reply it
    #: replaces.
    inherit: bool = False

    def render(self, values: Mapping[str, object], original: Reply | None = None) -> Reply:
        """The reply with the placeholders filled; ``original``: the reply this one
        replaces (its text is {detail}; its codes are kept for a str override)."""
        filled: dict[str, str] = {}
        for name in self.fields:
            if name == "detail" and original is not None:
                filled[name] = clean(" ".join(original.lines))
                continue
            try:
                filled[name] = clean(values[name])  # [] so a lazy mapping can compute it
            except KeyError:
                filled[name] = ""
        text = self.reply.lines
        if len(text) == 1:
            lines: tuple[str, ...] = (text[0].format_map(filled),)
        else:
            lines = tuple(line.format_map(filled) for line in text)
        base = original if self.inherit and original is not None else self.reply
        return Reply(base.code, base.status, lines)


def _class_status(code: int) -> str:
    return f"{code // 100}.0.0"


def _lines_of(text: str) -> tuple[str, ...]:
    return tuple(text.split("\n"))


@dataclass(frozen=True, slots=True)
class Persona:
    """How replies look. See the module docstring for every reply name and placeholder."""

    #: Replies by name, overriding the defaults of mailgate.protocol.replies. A ``str``
    #: keeps the default's codes and changes the text.
    replies: Mapping[str, Reply | str] = field(default_factory=dict, hash=False)
    #: Text of the 220 greeting after "220 ". Placeholders: {hostname}, {software},
    #: {protocol} ("ESMTP", or "LMTP" in LMTP mode), {date} (RFC 5322 date-time in the
    #: server's time zone, e.g. "Tue, 1 Dec 2026 10:00:00 +0000"), {client_ip}.
    banner: str = "{hostname} {protocol} {software}"
    #: First line of the EHLO (and LHLO) reply, after "250-". Placeholders: the banner's
    #: and {helo} (the name the client gave).
    ehlo_greeting: str = "{hostname} Hello {helo}"
    #: The HELO reply text. Same placeholders.
    helo_greeting: str = "{hostname} Hello {helo}"
    #: EHLO keyword order: these first, in this order; the rest after, in the default
    #: order. Keywords are the first word ("SIZE", "AUTH", "STARTTLS", "8BITMIME").
    capability_order: tuple[str, ...] = ()
    #: Extensions left out of EHLO even when mailgate offers them; their verb becomes an
    #: unknown command (CHUNKING: BDAT, STARTTLS, AUTH, VRFY, EXPN, HELP, XCLIENT,
    #: XFORWARD) and their MAIL/RCPT parameters are refused as not offered. Hiding
    #: CHUNKING hides BINARYMIME; hiding ENHANCEDSTATUSCODES drops the enhanced codes.
    hidden_capabilities: frozenset[str] = frozenset()
    #: Extensions left out of EHLO whose verb still works (products that answer VRFY or
    #: HELP without listing them). Hiding wins when a keyword is in both.
    unadvertised_capabilities: frozenset[str] = frozenset()
    #: HELP reply lines (placeholders {hostname}, {software}, {commands}: the verbs this
    #: session may use); empty: the default text.
    help: tuple[str, ...] = ()
    help_code: int = 214
    #: HELP per topic (a Sendmail helpfile): topic name (lower case) -> its lines. HELP
    #: with an argument answers the lines of every topic whose name starts with it
    #: (lower-cased), in this order, closed by the general HELP text's last line ("End of
    #: HELP info"); an argument no topic starts with gets ``help_unknown_topic``. Empty:
    #: every HELP gets the general text.
    help_topics: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    #: Whether enhanced status codes are written (and ENHANCEDSTATUSCODES offered).
    enhanced_status_codes: bool = True
    #: How the product behaves where it differs from mailgate (mailgate.protocol.behaviour).
    behaviour: Behaviour = DEFAULT_BEHAVIOUR

    # Derived once, in __post_init__.
    _static: dict[str, Reply] = field(init=False, repr=False, compare=False)
    _templates: Mapping[str, _Template] = field(init=False, repr=False, compare=False)
    _overridden: frozenset[str] = field(init=False, repr=False, compare=False)
    #: The names whose reply comes from an override, their own or along FALLBACKS.
    _worded: frozenset[str] = field(init=False, repr=False, compare=False)
    _hidden_verbs: frozenset[str] = field(init=False, repr=False, compare=False)
    _order: Mapping[str, int] = field(init=False, repr=False, compare=False)
    _banner: _Template = field(init=False, repr=False, compare=False)
    _ehlo: _Template = field(init=False, repr=False, compare=False)
    _helo: _Template = field(init=False, repr=False, compare=False)
    _help_rendered: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        put = object.__setattr__
        given_topics, rendered_topics = _help_topics(self.help_topics)
        put(self, "help_topics", MappingProxyType(given_topics))
        put(self, "_help_rendered", rendered_topics)
        if isinstance(self.help, str):
            put(self, "help", (self.help,))
        else:
            put(self, "help", tuple(self.help))
        order = tuple(self._keyword(k, "capability_order") for k in self.capability_order)
        if len(set(order)) != len(order):
            raise PersonaError(f"capability_order: a keyword is listed twice: {order}")
        put(self, "capability_order", order)
        if "PIPECONNECT" in order and self.behaviour.early_talkers != "greet":
            # PIPECONNECT tells clients they may send EHLO before the banner.
            raise PersonaError(
                "capability_order: PIPECONNECT needs behaviour early_talkers = 'greet'"
            )
        if isinstance(self.hidden_capabilities, str):
            raise PersonaError("hidden_capabilities: give a set of keywords, not a string")
        hidden = {self._keyword(k, "hidden_capabilities") for k in self.hidden_capabilities}
        if "CHUNKING" in hidden:
            hidden.add("BINARYMIME")  # RFC 3030: BINARYMIME needs BDAT
        put(self, "hidden_capabilities", frozenset(hidden))
        put(self, "_hidden_verbs", frozenset(_VERB_OF[k] for k in hidden if k in _VERB_OF))
        if isinstance(self.unadvertised_capabilities, str):
            raise PersonaError("unadvertised_capabilities: give a set of keywords, not a string")
        put(
            self,
            "unadvertised_capabilities",
            frozenset(
                self._keyword(k, "unadvertised_capabilities")
                for k in self.unadvertised_capabilities
            ),
        )
        put(self, "_order", MappingProxyType({k: i for i, k in enumerate(order)}))

        given: dict[str, Reply | str] = dict(self.replies)
        put(self, "replies", MappingProxyType(given))  # a copy: the caller's dict may change
        overrides = dict(given)  # plus what help/help_code make of the "help" reply
        unknown = [name for name in overrides if name not in REPLY_NAMES]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), REPLY_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PersonaError(f"unknown reply name {unknown[0]!r}{hint}")
        if not 200 <= self.help_code <= 299:
            raise PersonaError(
                f"help_code: {self.help_code} is not a 2xx code (hide HELP to refuse it)"
            )
        if self.help or self.help_code != replies.HELP.code:
            if "help" in overrides:
                raise PersonaError("help: give either help/help_code or replies['help']")
            try:
                overrides["help"] = Reply(
                    self.help_code, _class_status(self.help_code), self.help or replies.HELP.lines
                )
            except ReplyError as exc:
                raise PersonaError(f"help: {exc}") from None

        static: dict[str, Reply] = {}
        templates: dict[str, _Template] = {}
        worded: set[str] = set()
        for name, default in _DEFAULTS.items():
            override = overrides.get(name)
            general = name
            # Up the chain (expn_argument_required -> vrfy_argument_required ->
            # argument_required) to the first name the persona gives.
            while override is None and general in FALLBACKS:
                general = FALLBACKS[general]
                override = overrides.get(general)
            where = f"reply {name!r}"
            inherit = False
            if override is not None:
                worded.add(name)
            if override is None:
                reply = default
            elif isinstance(override, Reply):
                reply = override
                self._check_class(name, default, reply)
            elif isinstance(override, str):
                inherit = name in PASS_THROUGH
                try:
                    reply = Reply(default.code, default.status, _lines_of(override))
                except ReplyError as exc:
                    raise PersonaError(f"{where}: {exc}") from None
            else:
                raise PersonaError(f"{where}: give a Reply or a str, not {type(override).__name__}")
            fields: set[str] = set()
            for line in reply.lines:
                fields |= placeholders_in(line, PLACEHOLDERS[name], where)
            if fields or (name in PASS_THROUGH and override is not None):
                templates[name] = _Template(reply, frozenset(fields), inherit)
            elif override is None:
                static[name] = default
            else:
                # No placeholder: unescape the braces once, now.
                static[name] = Reply(
                    reply.code, reply.status, tuple(line.format_map({}) for line in reply.lines)
                )
        put(self, "_static", static)
        put(self, "_templates", MappingProxyType(templates))
        put(self, "_overridden", frozenset(overrides))
        put(self, "_worded", frozenset(worded))

        if not isinstance(self.behaviour, Behaviour):
            raise PersonaError(f"behaviour: give a Behaviour, not {type(self.behaviour).__name__}")
        put(self, "_banner", self._line_template("banner", self.banner, 220, BANNER_PLACEHOLDERS))
        put(self, "_ehlo", self._line_template("ehlo_greeting", self.ehlo_greeting, 250))
        put(self, "_helo", self._line_template("helo_greeting", self.helo_greeting, 250))

    @staticmethod
    def _keyword(keyword: object, where: str) -> str:
        if not isinstance(keyword, str):
            raise PersonaError(f"{where}: {keyword!r} is not a keyword")
        upper = keyword.upper()
        if upper not in KEYWORDS:
            close = difflib.get_close_matches(upper, KEYWORDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PersonaError(f"{where}: unknown EHLO keyword {keyword!r}{hint}")
        return upper

    @staticmethod
    def _check_class(name: str, default: Reply, reply: Reply) -> None:
        where = f"reply {name!r}"
        exact = _EXACT_CODES.get(name)
        if exact is not None and reply.code != exact:
            raise PersonaError(f"{where}: the code must be {exact}, not {reply.code}")
        if name in _EITHER_CLASS:
            return
        if default.is_positive and reply.code // 100 != default.code // 100:
            raise PersonaError(
                f"{where}: the code must be a {default.code // 100}xx like {default.code}, "
                f"not {reply.code}"
            )
        if not default.is_positive and reply.is_positive:
            raise PersonaError(f"{where}: the code must be a 4xx or 5xx refusal, not {reply.code}")

    @staticmethod
    def _line_template(
        where: str, text: str, code: int, allowed: frozenset[str] = GREETING_PLACEHOLDERS
    ) -> _Template:
        if not isinstance(text, str):
            raise PersonaError(f"{where}: give a str, not {type(text).__name__}")
        fields = placeholders_in(text, allowed, where)
        if not text.strip():
            # RFC 5321 4.3.1 / 4.1.1.1: the greeting and the HELO/EHLO reply start with a name.
            raise PersonaError(f"{where}: must not be empty (it starts with the server's name)")
        return _Template(Reply(code, None, (text,)), fields)

    # --- use ------------------------------------------------------------------------------

    def reply(self, name: str) -> Reply:
        """The reply ``name`` as configured: the override or the default. A reply with
        placeholders comes back unfilled (see :meth:`format`). KeyError for an unknown
        name."""
        static = self._static.get(name)
        if static is not None:
            return static
        return self._templates[name].reply

    def format(self, name: str, /, **values: object) -> Reply:
        """The reply ``name`` with its placeholders filled from ``values`` (missing ones
        are empty; values are cleaned of control characters). KeyError for an unknown
        name. Servers use it for replies the engine does not send itself, e.g.
        ``persona.format("message_queued", queue_id=qid, hostname=name)``."""
        return self.format_map(name, values)

    def format_map(self, name: str, values: Mapping[str, object]) -> Reply:
        """:meth:`format` with the values in a mapping, looked up (``values[key]``) only
        for the placeholders the text uses."""
        static = self._static.get(name)
        if static is not None:
            return static
        return self._templates[name].render(values)

    def adapt(
        self, name: str, original: Reply, values: Mapping[str, object] | None = None
    ) -> Reply:
        """What to send instead of ``original``, a reply built for the situation ``name``
        (a parser's specific reply, or the standard constant): the persona's override,
        with ``{detail}`` the original text, or ``original`` itself if not overridden."""
        if name not in self._worded:
            return original
        static = self._static.get(name)
        if static is not None:
            return static
        return self._templates[name].render({} if values is None else values, original)

    def outside_reply(self, name: str, /, **values: object) -> Reply:
        """A reply a server sends outside the dialogue (a connection limit, a bad PROXY
        header, an early talker), before any EHLO could ask for enhanced codes: mailgate's
        own text without its enhanced code, or the persona's text as the product writes
        it, its enhanced code (if the persona writes them) part of the text."""
        if name not in self._overridden:
            reply = self.reply(name)
            return Reply(reply.code, None, reply.lines)
        reply = self.format(name, **values)
        if reply.status is None or not self.enhanced_status_codes:
            return Reply(reply.code, None, reply.lines)
        return Reply(reply.code, None, tuple(f"{reply.status} {line}" for line in reply.lines))

    def banner_reply(self, values: Mapping[str, object]) -> Reply:
        """The 220 greeting (values: hostname, software, protocol, date, client_ip)."""
        return self._banner.render(values)

    @property
    def banner_fields(self) -> frozenset[str]:
        """The placeholders the banner uses."""
        return self._banner.fields

    def greeting_fields(self, esmtp: bool) -> frozenset[str]:
        """The placeholders the EHLO/LHLO (``esmtp``) or HELO greeting line uses."""
        return (self._ehlo if esmtp else self._helo).fields

    def greeting_line(self, esmtp: bool, values: Mapping[str, object]) -> str:
        """The first line of the EHLO/LHLO reply (``esmtp``) or the HELO reply text
        (values: the banner's and helo)."""
        return (self._ehlo if esmtp else self._helo).render(values).lines[0]

    def help_topic(self, argument: str) -> tuple[str, ...] | None:
        """The lines of every HELP topic whose name starts with ``argument`` (case does
        not matter), or None when no topic does (see :attr:`help_topics`)."""
        word = argument.strip().lower()
        lines = [
            line
            for name, text in self._help_rendered.items()
            if name.startswith(word)
            for line in text
        ]
        return tuple(lines) if lines else None

    @property
    def overridden(self) -> frozenset[str]:
        """The reply names this persona changes."""
        return self._overridden

    @property
    def static_replies(self) -> Mapping[str, Reply]:
        """Replies without placeholders, ready to send, by name."""
        return MappingProxyType(self._static)

    @property
    def static_lookup(self) -> Callable[[str], Reply | None]:
        """``get`` of :attr:`static_replies`, for hot paths: the ready reply or None."""
        return self._static.get

    @property
    def hidden_verbs(self) -> frozenset[str]:
        """Verbs answered as unknown commands because their extension is hidden."""
        return self._hidden_verbs

    def order_capabilities(self, capabilities: Iterable[str]) -> list[str]:
        """EHLO lines without the hidden and unadvertised keywords, in the persona's order."""
        hidden = self.hidden_capabilities | self.unadvertised_capabilities
        caps = [c for c in capabilities if c.split(" ", 1)[0] not in hidden]
        order = self._order
        if order:
            last = len(order)
            caps.sort(key=lambda c: order.get(c.split(" ", 1)[0], last))
        return caps


def _help_topics(
    topics: object,
) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """``help_topics`` checked (lower-case names, printable ASCII lines without
    placeholders, braces written ``{{``/``}}``): as given, and as sent (unescaped)."""
    if not isinstance(topics, Mapping):
        raise PersonaError(f"help_topics: give a mapping of topic -> lines, not {topics!r}")
    given: dict[str, tuple[str, ...]] = {}
    out: dict[str, tuple[str, ...]] = {}
    for name, lines in topics.items():
        where = f"help_topics: topic {name!r}"
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9-][a-z0-9_.+-]{0,30}", name):
            raise PersonaError(f"{where}: a topic is a lower-case word (letters, digits, -_.+)")
        if isinstance(lines, str) or not isinstance(lines, Iterable):
            raise PersonaError(f"{where}: give a list of lines")
        text = tuple(lines)
        if not text or not all(isinstance(line, str) for line in text):
            raise PersonaError(f"{where}: give a non-empty list of lines")
        for line in text:
            placeholders_in(line, frozenset(), where)
        given[name] = text
        out[name] = tuple(line.format_map({}) for line in text)
    return given, out


#: mailgate's own look (ProtocolConfig's default).
DEFAULT_PERSONA = Persona()

__all__ = [
    "ADDRESS_KIND_REPLIES",
    "AUTH_REPLIES",
    "BANNER_PLACEHOLDERS",
    "DEFAULT_PERSONA",
    "ECHO_LIMIT",
    "ECHO_PLACEHOLDERS",
    "ENVELOPE_REPLIES",
    "FALLBACKS",
    "GREETING_PLACEHOLDERS",
    "KEYWORDS",
    "LOCAL_PART_REPLIES",
    "NOT_ANSWERS",
    "OPT_IN_KEYWORDS",
    "PASS_THROUGH",
    "PLACEHOLDERS",
    "REPLY_NAMES",
    "CurrentDate",
    "Persona",
    "PersonaError",
    "clean",
    "echo",
    "echo_values",
    "format_date",
    "local_now",
    "local_part_read",
    "placeholders_in",
    "split_written_path",
]
