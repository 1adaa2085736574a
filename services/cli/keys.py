"""`exegpt keys new | hash`: API keys for the gateway's keys file (``EXEGPT_API_KEYS_FILE``).

    exegpt keys new --owner alice --scope admin   # a fresh key, and its line for the keys file
    exegpt keys hash sk-...                       # the SHA-256 a keys file holds (stdin if no KEY)

A keys file holds one ``<sha256 hex> <owner> <user|admin>`` a line; the key itself stays with
its owner.
"""

from __future__ import annotations

import argparse
import secrets
import sys


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "keys",
        help="make API keys and their keys-file lines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = parser.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")
    cmds.required = True
    p = cmds.add_parser("new", help="a fresh random key and its keys-file line")
    p.add_argument("--owner", required=True, help="who holds the key (no spaces)")
    p.add_argument("--scope", choices=("user", "admin"), default="user")
    p.set_defaults(func=_new)
    p = cmds.add_parser("hash", help="a key's SHA-256 hex, as the keys file holds it")
    p.add_argument("key", nargs="?", help="the key (default: read from stdin)")
    p.set_defaults(func=_hash)


def _new(args: argparse.Namespace) -> int:
    from common.cli import CliError
    from services.gateway.keys import hash_key

    if not args.owner or any(c.isspace() for c in args.owner):
        raise CliError("--owner must be one word")
    key = f"sk-exegpt-{secrets.token_urlsafe(32)}"
    print(f"key:  {key}")
    print(f"line: {hash_key(key)} {args.owner} {args.scope}")
    return 0


def _hash(args: argparse.Namespace) -> int:
    from services.gateway.keys import hash_key

    key = args.key if args.key is not None else sys.stdin.readline().strip()
    print(hash_key(key))
    return 0
