"""Compatibility layers: run code written for other SMTP servers on mailgate's hooks.

``mailgate.compat.aiosmtpd`` runs aiosmtpd handler objects (``handle_RCPT``,
``handle_DATA``, ...) unchanged.
"""
