"""The `forwarder` command: parses arguments and calls the modules (PRODUCT.md CLI contract).

Exit status: 0 success, 1 a refused or failed operation (one line on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forwarder import replies
from forwarder.addresses import AddressError, parse_address, validate_redirect_syntax
from forwarder.config import ConfigError, Settings, load_settings
from forwarder.directory import AccountRow, Directory, DirectoryError
from forwarder.importer import parse_import
from forwarder.policy import (
    Accept,
    AccountState,
    NeedsLookup,
    Refuse,
    classify_recipient,
    decide_account,
)
from forwarder.queueadmin import QueueAdmin, QueueAdminError


class CliError(Exception):
    """A refused or failed operation: exit 1 with this one-line reason."""


Handler = Callable[[argparse.Namespace, Settings], int]


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "state_dir": getattr(args, "state_dir", None),
        "listen": getattr(args, "listen", None),
        "smarthost": getattr(args, "smarthost", None),
        "mailbox_host": getattr(args, "mailbox_host", None),
        "log_format": getattr(args, "log_format", None),
        "log_level": getattr(args, "log_level", None),
    }
    return load_settings(args.config, overrides)


def _emit(args: argparse.Namespace, doc: Any, text: str) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else text)


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _account_doc(row: AccountRow) -> dict[str, Any]:
    return {"address": row.address, "state": row.state.value, "redirect": row.redirect,
            "created_at": _iso(row.created_at), "updated_at": _iso(row.updated_at)}


def _account_line(row: AccountRow) -> str:
    return f"{row.address}\t{row.state.value}\t{row.redirect or '-'}"


def _address_key(text: str, settings: Settings) -> str:
    try:
        address = parse_address(text.strip())
    except AddressError as exc:
        raise CliError(f"{text}: {exc}") from exc
    if address.domain not in settings.domains:
        raise CliError(f"{text}: not in our domains ({', '.join(settings.domains)})")
    return address.key


def _target(text: str, settings: Settings) -> str:
    try:
        return validate_redirect_syntax(text, settings.domains)
    except AddressError as exc:
        raise CliError(f"redirect target refused: {exc}") from exc


def _directory(settings: Settings) -> Directory:
    return Directory(settings.directory_path, settings.busy_timeout)


# --- account --------------------------------------------------------------------------


def cmd_account_add(args: argparse.Namespace, settings: Settings) -> int:
    key = _address_key(args.address, settings)
    target = _target(args.redirect, settings) if args.redirect else None
    row = _directory(settings).add(key, target)
    _emit(args, _account_doc(row), f"added {_account_line(row)}")
    return 0


def cmd_account_redirect(args: argparse.Namespace, settings: Settings) -> int:
    key = _address_key(args.address, settings)
    row = _directory(settings).set_redirect(key, _target(args.target, settings))
    _emit(args, _account_doc(row), f"redirected {_account_line(row)}")
    return 0


def cmd_account_unredirect(args: argparse.Namespace, settings: Settings) -> int:
    row = _directory(settings).set_redirect(_address_key(args.address, settings), None)
    _emit(args, _account_doc(row), f"unredirected {_account_line(row)}")
    return 0


def cmd_account_delete(args: argparse.Namespace, settings: Settings) -> int:
    row = _directory(settings).delete(_address_key(args.address, settings))
    _emit(args, _account_doc(row), f"deleted {_account_line(row)}")
    return 0


def cmd_account_purge(args: argparse.Namespace, settings: Settings) -> int:
    key = _address_key(args.address, settings)
    if not args.yes:
        raise CliError(f"{key}: purge erases every trace; confirm with --yes")
    _directory(settings).purge(key)
    _emit(args, {"purged": key}, f"purged {key}")
    return 0


def cmd_account_show(args: argparse.Namespace, settings: Settings) -> int:
    row = _directory(settings).require(_address_key(args.address, settings))
    _emit(args, _account_doc(row), _account_line(row))
    return 0


def cmd_account_list(args: argparse.Namespace, settings: Settings) -> int:
    state = AccountState(args.state) if args.state else None
    rows = list(_directory(settings).accounts(state, args.with_redirect))
    _emit(args, {"accounts": [_account_doc(r) for r in rows], "count": len(rows)},
          "\n".join([_account_line(r) for r in rows] + [f"-- {len(rows)} accounts"]))
    return 0


def cmd_account_history(args: argparse.Namespace, settings: Settings) -> int:
    key = _address_key(args.address, settings)
    entries = _directory(settings).history(key)
    for entry in entries:
        entry["at"] = _iso(float(str(entry["at"])))
    lines = [f"{e['at']}\t{e['actor']}\t{e['action']}\t{json.dumps(e['old'])} -> "
             f"{json.dumps(e['new'])}" for e in entries]
    _emit(args, {"address": key, "history": entries}, "\n".join(lines) or "no history")
    return 0


def cmd_account_import(args: argparse.Namespace, settings: Settings) -> int:
    parsed = parse_import(Path(args.file), settings.domains,
                          lambda t: validate_redirect_syntax(t, settings.domains))
    if parsed.errors:
        for line, reason in parsed.errors:
            print(f"{args.file}:{line}: {reason}", file=sys.stderr)
        raise CliError(f"{len(parsed.errors)} bad line(s); nothing was imported")
    report = _directory(settings).import_rows(parsed.rows, dry_run=args.dry_run)
    doc = {"dry_run": args.dry_run, "rows": len(parsed.rows), **vars(report)}
    verb = "would import" if args.dry_run else "imported"
    _emit(args, doc, f"{verb} {len(parsed.rows)} rows: {report.added} added, "
          f"{report.changed} changed, {report.deleted} deleted, {report.unchanged} unchanged")
    return 0


# --- lookup ---------------------------------------------------------------------------


def cmd_lookup(args: argparse.Namespace, settings: Settings) -> int:
    verdict = classify_recipient(args.address, settings.domains, settings.postmaster)
    if isinstance(verdict, NeedsLookup):
        row = _directory(settings).get(verdict.address.key)
        verdict = decide_account(None if row is None else row.account, settings.domains,
                                 settings.mailbox_host is not None)
    doc: dict[str, Any] = {"address": args.address, "reason": verdict.reason}
    if isinstance(verdict, Refuse):
        doc.update(verdict="refused", reply=verdict.reply.at(args.address), route=None,
                   target=None)
    elif isinstance(verdict, Accept):
        doc.update(verdict="accepted", reply=str(replies.RCPT_OK), route=verdict.route.value,
                   target=verdict.target)
    text = f"{args.address}: {doc['verdict']} ({doc['reason']})\nreply: {doc['reply']}"
    if doc["route"]:
        text += f"\nroute: {doc['route']} -> {doc['target']}"
    _emit(args, doc, text)
    return 0


# --- queue ----------------------------------------------------------------------------


def _queue(settings: Settings) -> QueueAdmin:
    return QueueAdmin(settings.queue_path, settings.busy_timeout)


def cmd_queue_list(args: argparse.Namespace, settings: Settings) -> int:
    messages = _queue(settings).list()
    now = time.time()
    lines = []
    for m in messages:
        held = " (held)" if m.held else ""
        lines.append(f"{m.id}{held}\t{int(now - m.arrived_at)}s\t{m.size}\t<{m.sender}>")
        for r in m.recipients:
            lines.append(f"\t{r.rcpt}\t{r.state}\tattempts={r.attempts}\t"
                         f"next={_iso(r.next_attempt)}\t{r.last_error or ''}")
    total = sum(m.size for m in messages)
    lines.append(f"-- {total // 1024} Kbytes in {len(messages)} requests.")
    _emit(args, {"messages": [m.as_dict() for m in messages], "count": len(messages),
                 "bytes": total}, "\n".join(lines))
    return 0


def cmd_queue_show(args: argparse.Namespace, settings: Settings) -> int:
    doc = _queue(settings).show(args.id)
    text = json.dumps(doc, indent=2, sort_keys=True)
    _emit(args, doc, text)
    return 0


def cmd_queue_retry(args: argparse.Namespace, settings: Settings) -> int:
    count = _queue(settings).retry(args.id, time.time())
    _emit(args, {"retried": count}, f"{count} recipient(s) due now")
    return 0


def cmd_queue_hold(args: argparse.Namespace, settings: Settings) -> int:
    _queue(settings).hold(args.id, True)
    print(f"{args.id}: held")
    return 0


def cmd_queue_release(args: argparse.Namespace, settings: Settings) -> int:
    _queue(settings).hold(args.id, False)
    print(f"{args.id}: released")
    return 0


def cmd_queue_delete(args: argparse.Namespace, settings: Settings) -> int:
    if not args.yes:
        raise CliError(f"{args.id}: deleting loses the message; confirm with --yes")
    _queue(settings).delete(args.id)
    print(f"{args.id}: deleted")
    return 0


# --- serve and check ------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from forwarder import daemon

    # SIGHUP re-reads the same file with the same flags on top (flags keep precedence).
    return daemon.run(settings, reload_settings=lambda: _settings(args))


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    problems: list[str] = []
    try:
        Directory(settings.directory_path, settings.busy_timeout).close()
    except (sqlite3.Error, OSError, DirectoryError) as exc:
        problems.append(f"directory {settings.directory_path}: {exc}")
    for problem in problems:
        print(problem, file=sys.stderr)
    _emit(args, {"ok": not problems, "problems": problems},
          "configuration and storage OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


# --- argument parsing -----------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, json_flag: bool = False) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="TOML configuration file (default: $FORWARDER_CONFIG, else built-in)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="directory holding the databases (default ./forwarder-data)")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print one JSON document")
    else:
        parser.set_defaults(json=False)


def _command(
    sub: Any, name: str, handler: Handler, help_text: str, example: str,
    json_flag: bool = False,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=help_text, epilog=f"example: {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser, json_flag)
    parser.set_defaults(handler=handler)
    return parser


def _account_parsers(sub: Any) -> None:
    account = sub.add_parser("account", help="manage the directory of addresses")
    acc = account.add_subparsers(dest="account_command", required=True, metavar="COMMAND")
    p = _command(acc, "add", cmd_account_add, "add a new enrolled student (state active)",
                 "forwarder account add marie.curie@sigma-clermont.fr", json_flag=True)
    p.add_argument("address")
    p.add_argument("--redirect", metavar="TARGET", help="forwarding address once deleted")
    p.add_argument("--no-dns-check", action="store_true", help="skip the target's DNS check")
    p = _command(acc, "redirect", cmd_account_redirect, "declare or change the redirect",
                 "forwarder account redirect marie.curie@sigma-clermont.fr mc@example.org",
                 json_flag=True)
    p.add_argument("address")
    p.add_argument("target")
    p.add_argument("--no-dns-check", action="store_true", help="skip the target's DNS check")
    for name, handler, text in (
        ("unredirect", cmd_account_unredirect, "withdraw the redirect"),
        ("delete", cmd_account_delete, "the school account is deleted (redirect kept)"),
        ("show", cmd_account_show, "show one account"),
        ("history", cmd_account_history, "show the audit trail of one account"),
    ):
        p = _command(acc, name, handler, text,
                     f"forwarder account {name} marie.curie@sigma-clermont.fr", json_flag=True)
        p.add_argument("address")
    p = _command(acc, "purge", cmd_account_purge, "erase every trace of an account (GDPR)",
                 "forwarder account purge marie.curie@sigma-clermont.fr --yes", json_flag=True)
    p.add_argument("address")
    p.add_argument("--yes", action="store_true", help="confirm the erasure")
    p = _command(acc, "list", cmd_account_list, "list accounts",
                 "forwarder account list --state deleted --without-redirect", json_flag=True)
    p.add_argument("--state", choices=[s.value for s in AccountState])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--with-redirect", dest="with_redirect", action="store_const",
                       const=True, default=None)
    group.add_argument("--without-redirect", dest="with_redirect", action="store_const",
                       const=False)
    p = _command(acc, "import", cmd_account_import,
                 "bulk load the student records export (CSV: email,redirect,status)",
                 "forwarder account import students.csv --dry-run", json_flag=True)
    p.add_argument("file")
    p.add_argument("--dry-run", action="store_true", help="report what would change only")
    p.add_argument("--no-dns-check", action="store_true", help="skip the targets' DNS check")


def _queue_parsers(sub: Any) -> None:
    queue = sub.add_parser("queue", help="inspect and steer the mail queue")
    q = queue.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")
    _command(q, "list", cmd_queue_list, "list queued messages (like postqueue -p)",
             "forwarder queue list --json", json_flag=True)
    p = _command(q, "show", cmd_queue_show, "show one message: envelope, headers, attempts",
                 "forwarder queue show GEZDGNBVGY3TQOJQ", json_flag=True)
    p.add_argument("id")
    p = _command(q, "retry", cmd_queue_retry, "make deferred mail due now (all, or one id)",
                 "forwarder queue retry", json_flag=True)
    p.add_argument("id", nargs="?")
    for name, handler, text in (
        ("hold", cmd_queue_hold, "keep a message from being delivered"),
        ("release", cmd_queue_release, "release a held message"),
    ):
        p = _command(q, name, handler, text, f"forwarder queue {name} GEZDGNBVGY3TQOJQ")
        p.add_argument("id")
    p = _command(q, "delete", cmd_queue_delete, "delete a message from the queue",
                 "forwarder queue delete GEZDGNBVGY3TQOJQ --yes")
    p.add_argument("id")
    p.add_argument("--yes", action="store_true", help="confirm the deletion")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forwarder", description="Mail forwarder for graduates' school addresses.",
        epilog="example: forwarder serve --listen 127.0.0.1:2525")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _command(sub, "serve", cmd_serve, "run the daemon",
                 "forwarder serve --listen 0.0.0.0:25 --smarthost relay.example:25")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to listen on")
    p.add_argument("--smarthost", metavar="HOST:PORT", help="relay all forwarded mail here")
    p.add_argument("--mailbox-host", metavar="HOST:PORT", help="where active accounts' mail goes")
    p.add_argument("--log-format", choices=["json", "console"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    _account_parsers(sub)
    p = _command(sub, "lookup", cmd_lookup, "what mail to ADDRESS would get, and why",
                 "forwarder lookup marie.curie@sigma-clermont.fr", json_flag=True)
    p.add_argument("address")
    _queue_parsers(sub)
    _command(sub, "check", cmd_check, "validate configuration and storage", "forwarder check",
             json_flag=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"forwarder: config: {problem}", file=sys.stderr)
        return 1
    try:
        result: int = args.handler(args, settings)
        return result
    except (CliError, DirectoryError, QueueAdminError) as exc:
        print(f"forwarder: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"forwarder: database error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
