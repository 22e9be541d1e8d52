"""``mailgate dkim keygen``: a DKIM key for ``[[dkim_sign]]`` and the DNS record to publish.

The private key goes to ``DIR/<domain>.<selector>.key`` (mode 0600; an existing file is
kept unless ``--force``, as its public half may already be in DNS); the TXT record is
printed, as the record's name and value and as a zone-file line, and also written beside
the key as ``DIR/<domain>.<selector>.txt``. Exit statuses: 0 done, 1 the key file exists
or cannot be written, 2 a wrong argument.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, cast

_EPILOG = """\
exit status:
  0 the key was written; 1 the key file exists (see --force) or cannot be written;
  2 a wrong argument.

docs/outbound.md shows the whole setup: SPF, this key, [[dkim_sign]], DMARC.
"""


def add_dkim_parser(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``dkim`` and its ``keygen`` subcommand to the ``mailgate`` parser."""
    dkim = commands.add_parser(
        "dkim",
        help="make DKIM keys for [[dkim_sign]]",
        description="Work with the DKIM keys of [[dkim_sign]].",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = dkim.add_subparsers(dest="dkim_command", metavar="ACTION", required=True)
    keygen = actions.add_parser(
        "keygen",
        help="write a new private key and print the DNS TXT record to publish",
        description="Write a new DKIM private key (readable by its owner only) and print "
        "the TXT record that publishes its public half at <selector>._domainkey.<domain>.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keygen.add_argument("--domain", required=True, help="the signing domain (d=)")
    keygen.add_argument("--selector", required=True, help="the selector (s=), e.g. s2026")
    keygen.add_argument(
        "--algorithm",
        choices=("rsa-sha256", "ed25519-sha256"),
        default="rsa-sha256",
        help="rsa-sha256 (default; every receiver checks it) or ed25519-sha256 (RFC 8463; "
        "use it beside an RSA key)",
    )
    keygen.add_argument(
        "--bits", type=int, default=2048, help="RSA key size (default 2048; at least 1024)"
    )
    keygen.add_argument(
        "--out", required=True, metavar="DIR", help="directory for the key (made if missing)"
    )
    keygen.add_argument(
        "--force", action="store_true", help="replace an existing key file of that name"
    )


def run_dkim(args: argparse.Namespace) -> int:
    """Run ``mailgate dkim keygen ...``; the exit status."""
    from mailgate.queue.dkim_keys import (
        Algorithm,
        KeyFileError,
        generate_key,
        record_name,
        txt_record,
        write_key_file,
        zone_line,
    )
    from mailgate.settings.converters import is_host_name

    domain = str(args.domain).strip().rstrip(".").lower()
    selector = str(args.selector).strip().lower()
    if not is_host_name(domain):
        return _fail(f"--domain: {args.domain!r} is not a domain name", 2)
    if not is_host_name(selector):
        return _fail(f"--selector: {args.selector!r} is not a selector (DNS labels)", 2)
    algorithm = cast(Algorithm, args.algorithm)
    try:
        key = generate_key(algorithm, args.bits)
    except KeyFileError as exc:
        return _fail(f"--bits: {exc}", 2)
    directory = Path(args.out)
    path = directory / f"{domain}.{selector}.key"
    record = txt_record(key)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_key_file(path, key, overwrite=args.force)
        (directory / f"{domain}.{selector}.txt").write_text(
            zone_line(selector, domain, record) + "\n", encoding="utf-8"
        )
    except FileExistsError:
        return _fail(
            f"{path} exists; its key may be published already. Choose another selector, "
            "or --force to replace it",
            1,
        )
    except OSError as exc:
        return _fail(f"cannot write {path}: {exc.strerror or exc}", 1)
    print(f"Private key: {path} (mode 0600; the key_file of [[dkim_sign]])")
    print()
    print("Publish this TXT record in DNS:")
    print(f"  name:  {record_name(selector, domain)}")
    print(f"  value: {record}")
    print()
    print("As a zone-file line (long values are split into strings of 255 characters):")
    print(zone_line(selector, domain, record))
    return 0


def _fail(message: str, status: int) -> int:
    print(f"mailgate dkim keygen: error: {message}", file=sys.stderr)
    return status
