"""mailgate's version: a leaf module, so that any layer may name the version (the
aiosmtpd adapter's banner, ``mailgate --version``) without importing the package root,
which re-exports the facade from the composition layer."""

__version__ = "0.1.0"
