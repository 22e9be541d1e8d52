"""mailgate: an embeddable SMTP/LMTP server."""

__version__ = "0.1.0"
