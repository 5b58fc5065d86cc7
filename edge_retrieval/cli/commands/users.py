"""``edge-retrieval users add|list|remove``: console accounts in the server's database.

The password comes from a prompt (asked twice) or the first line of ``--password-file``; it is
never an argument (it would show in ``ps`` and shell history).
"""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path

from ...errors import ConfigError
from .server import add_db_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("add", "list", "remove"))
    p.add_argument("name", nargs="?", help="account name (add, remove)")
    p.add_argument("--role", choices=("viewer", "ranger"), default="viewer",
                   help="viewer reads; ranger also changes alerts and gives feedback (default viewer)")
    p.add_argument("--password-file", type=Path, help="read the password from this file's first line")
    p.add_argument("--replace", action="store_true", help="add: replace an existing account's role and password")
    add_db_argument(p)


def _password(args: argparse.Namespace) -> str:
    if args.password_file is not None:
        try:
            lines = args.password_file.read_text("utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"--password-file {str(args.password_file)!r} cannot be read: {exc}") from exc
        if not lines or not lines[0]:
            raise ConfigError(f"--password-file {str(args.password_file)!r} is empty (expected the password on line 1)")
        return lines[0]
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise ConfigError("the two passwords differ")
    return first


def main(args: argparse.Namespace) -> int:
    from ...server.users import Users

    if args.action in ("add", "remove") and not args.name:
        raise ConfigError(f"users {args.action} needs a NAME")
    users = Users(args.db)
    try:
        if args.action == "add":
            users.add(args.name, args.role, _password(args), replace=args.replace)
            print(f"user {args.name} ({args.role}) saved in {users.where}")
        elif args.action == "remove":
            users.remove(args.name)
            print(f"user {args.name} removed")
        else:
            for u in users.list():
                print(f"{u['name']:<24} {u['role']:<8} {u['created']}")
    finally:
        users.close()
    return 0
