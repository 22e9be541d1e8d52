"""Honeypot mode: mailgate's real SMTP engine wearing the persona of a known product.

``personas`` holds the product personas and the TOML profile loader; the capture store,
the plugin and the reports live in their own modules. Nothing is imported here, so
importing one part does not pull in the others.
"""
