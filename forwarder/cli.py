"""The `forwarder` command: parses arguments and calls the modules (PRODUCT.md CLI contract).

Exit status: 0 success, 1 a refused or failed operation (one line on stderr), 2 bad usage.
The subcommands live in cli_account.py, cli_targets.py and cli_import.py (directory,
targets, import), cli_queue.py (queue tools), cli_lookup.py (lookup), cli_ops.py (check,
srs, token, serve), cli_status.py (status), cli_report.py (report senders) and
cli_history.py (history, send-test); cli_common.py has what they share.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Sequence

from forwarder import (
    cli_account,
    cli_history,
    cli_lookup,
    cli_ops,
    cli_queue,
    cli_report,
    cli_status,
)
from forwarder.cli_common import CliError, close_directories, emit, one_line, settings_for
from forwarder.config import ConfigError, Settings
from forwarder.directory import DirectoryError
from forwarder.privileges import PrivilegeError, act_as_owner, restrict_umask
from forwarder.queueadmin import QueueAdminError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forwarder", description="Mail forwarder for graduates' school addresses.",
        epilog="example:\n  forwarder lookup marie.curie@sigma-clermont.fr\n"
               "Every command has --help with an example; see docs/admin.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_ops.register(sub)
    cli_lookup.register(sub)
    cli_status.register(sub)
    cli_account.register(sub)
    cli_queue.register(sub)
    cli_report.register(sub)
    cli_history.register(sub)
    return parser


def _fail(message: str) -> int:
    print(f"forwarder: {one_line(message)}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    restrict_umask()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or bad usage (2): a status, also for callers
        return exc.code if isinstance(exc.code, int) else 2
    try:
        settings = settings_for(args)
    except ConfigError as exc:
        fallback = cli_ops.config_error_settings(args, exc)
        if fallback is None:
            for problem in exc.problems:
                _fail(f"config: {problem}")
            return 1
        settings = fallback
    try:
        act_as_owner(settings.state_dir)
    except PrivilegeError as exc:
        return _fail(str(exc))
    try:
        return _handle(args, settings)
    finally:
        close_directories()


def _handle(args: argparse.Namespace, settings: Settings) -> int:
    try:
        result: int = args.handler(args, settings)
        return result
    except CliError as exc:
        if args.json and exc.doc is not None:
            emit(args, exc.doc, "")
        return _fail(str(exc))
    except (DirectoryError, QueueAdminError) as exc:
        return _fail(str(exc))
    except sqlite3.Error as exc:
        return _fail(f"database error: {exc} (is --state-dir right, and this the "
                     "service user?)")
    except OSError as exc:
        return _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))


if __name__ == "__main__":
    sys.exit(main())
