"""Local delivery of accepted mail: durable before the 250 after DATA is sent."""

from .maildir import MaildirStore
from .mbox import MboxLockError, MboxStore

__all__ = ["MaildirStore", "MboxLockError", "MboxStore"]
