"""What every `forwarder` subcommand shares: settings, output, errors, parser helpers.

Output conventions (docs/admin.md, "Output"): a human text on stdout, or with --json one
JSON document (sorted keys, times in ISO 8601 UTC); errors on stderr, one line each;
exit 0 success, 1 refused or failed, 2 bad usage (argparse).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from forwarder.addresses import AddressError, parse_address
from forwarder.config import Settings, load_settings
from forwarder.directory import Directory
from forwarder.policy import ROLE_ACCOUNTS, is_reserved_local
from forwarder.redirects import DEFAULT_DNS_TIMEOUT

Handler = Callable[[argparse.Namespace, Settings], int]

# Settings that a command-line flag may override (flags beat the file: PRODUCT.md).
_OVERRIDES = ("state_dir", "listen", "smarthost", "mailbox_host", "log_format", "log_level",
              "acceptors")


class CliError(Exception):
    """A refused or failed operation: exit 1 with this one-line reason on stderr.

    `doc`, if given, is printed on stdout under --json (e.g. an import's bad lines)."""

    def __init__(self, message: str, doc: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.doc = doc


def settings_for(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {key: getattr(args, key, None) for key in _OVERRIDES}
    if getattr(args, "dns_server", None):
        overrides["dns_servers"] = list(args.dns_server)
    return load_settings(args.config, overrides)


def emit(args: argparse.Namespace, doc: Any, text: str) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else text)


def one_line(text: str) -> str:
    """Control characters escaped: a reason is one line even if it quotes a CR/LF."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def duration(seconds: float) -> str:
    """A short age: 45s, 12m, 3h05m, 2d04h (as an admin reads a queue listing)."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def address_key(text: str, settings: Settings, roles: bool = False) -> str:
    """The directory key of an address of ours, or CliError saying why it cannot be one.
    `roles`: role accounts (postmaster@...) are fine too (they have a delivery history)."""
    try:
        address = parse_address(text.strip())
    except AddressError as exc:
        raise CliError(f"{one_line(text)}: {exc}") from exc
    if address.domain not in settings.domains:
        raise CliError(f"{text}: not in our domains ({', '.join(settings.domains)})")
    if roles:
        return address.key
    if address.local.lower() in ROLE_ACCOUNTS:
        raise CliError(f"{text}: a role account, forwarded to the configured postmaster; "
                       "it has no directory entry")
    if is_reserved_local(address.local):
        raise CliError(f"{text}: reserved for the notices' confirm+ and refuse+ addresses")
    return address.key


def open_directory(settings: Settings) -> Directory:
    """The directory for admin commands (`AdminDirectory`): the SQLite file, or with
    `directory_url` the PostgreSQL directory several nodes share (docs/cluster.md)."""
    if settings.directory_url:
        from forwarder.directory.pgadmin import PgDirectory

        directory: Directory = PgDirectory(settings.directory_url,
                                           settings.directory_password)
    else:
        directory = Directory(settings.directory_path, settings.busy_timeout)
    _opened.append(directory)
    return directory


# The directories a command opened, closed when it ends (cli.main): a PostgreSQL
# connection is not left for the garbage collector to find.
_opened: list[Directory] = []


def close_directories() -> None:
    while _opened:
        _opened.pop().close()


def add_common(parser: argparse.ArgumentParser, json_flag: bool) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="TOML configuration file (default: $FORWARDER_CONFIG, else built-in)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="directory holding the databases (default ./forwarder-data)")
    if json_flag:
        parser.add_argument("--json", action="store_true",
                            help="print one JSON document (keys: docs/admin.md)")
    else:
        parser.set_defaults(json=False)


def add_dns_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-dns-check", action="store_true",
                        help="skip the check that the target's domain has MX or A/AAAA records")
    parser.add_argument("--dns-server", metavar="HOST[:PORT]", action="append",
                        help="nameserver for the check (default: dns_servers, else the system's)")
    # Hidden: tests shorten it; the default suits real resolvers.
    parser.add_argument("--dns-timeout", type=float, default=DEFAULT_DNS_TIMEOUT,
                        help=argparse.SUPPRESS)


def add_command(
    sub: Any, name: str, handler: Handler, help_text: str, example: str,
    json_flag: bool = False,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(parser, json_flag)
    parser.set_defaults(handler=handler)
    return parser


def add_group(sub: Any, name: str, help_text: str, example: str) -> Any:
    """A command with subcommands (account, queue, srs); returns its subparsers."""
    parser = sub.add_parser(name, help=help_text, description=help_text,
                            epilog=f"example:\n  {example}",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")
