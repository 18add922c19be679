"""``facegate``: operator commands. ``facegate token new`` prints a fresh token and the hash to configure;
``facegate token hash`` reads a token from stdin and prints its hash."""

from __future__ import annotations

import argparse
import sys

from server.auth.tokens import hash_token, new_token


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="facegate", description=__doc__)
    sub = p.add_subparsers(dest="group", required=True)
    token = sub.add_parser("token", help="bearer tokens").add_subparsers(dest="action", required=True)
    token.add_parser("new", help="print a new random token and its salted hash")
    token.add_parser("hash", help="read a token on stdin, print its salted hash")
    args = p.parse_args(argv)
    if args.action == "new":
        t = new_token()
        print(f"token: {t}\nhash:  {hash_token(t)}")
        return 0
    text = sys.stdin.readline().strip()
    try:
        print(hash_token(text))
    except ValueError as exc:
        print(f"facegate: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
