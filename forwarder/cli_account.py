"""`forwarder account ...`: the directory of addresses, its targets, its audit trail."""

from __future__ import annotations

import argparse
from typing import Any

from forwarder import cli_import
from forwarder.cli_common import (
    CliError,
    add_command,
    add_dns_options,
    add_group,
    address_key,
    emit,
    iso,
    open_directory,
)
from forwarder.cli_targets import (
    account_doc,
    account_line,
    mail_now,
    send_notices,
    target_lines,
    validated_targets,
)
from forwarder.config import Settings
from forwarder.directory import DirectoryError, Written
from forwarder.history.store import erase as erase_history
from forwarder.policy import AccountState
from forwarder.targets import MAX_TARGETS, TargetState

EXAMPLE_ADDRESS = "marie.curie@sigma-clermont.fr"


def _written(args: argparse.Namespace, settings: Settings, verb: str, written: Written,
             notices: int = 0) -> None:
    row = written.row
    doc = account_doc(row) | {"notices": notices}
    sent = f"; {notices} notice(s) queued" if notices else ""
    emit(args, doc, "\n".join([f"{verb} {account_line(row)}{sent}", *target_lines(row),
                               mail_now(row, settings)]))


def cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    key = address_key(args.address, settings)
    targets = validated_targets([args.redirect], args, settings) if args.redirect else []
    directory = open_directory(settings)
    written = directory.add(key, targets)
    _written(args, settings, "added", written,
             send_notices(settings, directory, written.declared))
    return 0


def cmd_redirect(args: argparse.Namespace, settings: Settings) -> int:
    key = address_key(args.address, settings)
    if len(args.targets) > MAX_TARGETS:
        raise CliError(f"{key}: {len(args.targets)} targets given; at most {MAX_TARGETS} "
                       "are allowed")
    directory = open_directory(settings)
    # An unknown address is refused before any DNS wait; targets kept are not checked again.
    known = [t.target for t in directory.require(key).targets]
    targets = validated_targets(args.targets, args, settings, known)
    written = directory.set_targets(key, targets)
    _written(args, settings, "redirected", written,
             send_notices(settings, directory, written.declared))
    return 0


def cmd_target(args: argparse.Namespace, settings: Settings) -> int:
    key = address_key(args.address, settings)
    directory = open_directory(settings)
    account = directory.require(key)
    target = next((t.target for t in account.targets
                   if t.target.lower() == args.target.strip().lower()), args.target.strip())
    written = directory.switch_target(key, target, args.switch == "on")
    _written(args, settings, f"switched {args.switch}", written,
             send_notices(settings, directory, written.declared))
    return 0


def cmd_unredirect(args: argparse.Namespace, settings: Settings) -> int:
    written = open_directory(settings).set_targets(address_key(args.address, settings), [])
    _written(args, settings, "unredirected", written)
    return 0


def cmd_delete(args: argparse.Namespace, settings: Settings) -> int:
    written = open_directory(settings).delete(address_key(args.address, settings))
    _written(args, settings, "deleted", written)
    return 0


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    key = address_key(args.address, settings)
    if not args.yes:
        raise CliError(f"{key}: purge erases the account and its history; confirm with --yes")
    try:
        open_directory(settings).purge(key)
    except DirectoryError:
        # Purged already (on another node, with a shared directory): its delivery history
        # here is erased all the same, since each node keeps its own.
        erased = erase_history(settings.queue_path, key, settings.busy_timeout)
        if not erased:
            raise
        emit(args, {"purged": key, "account": False, "history_rows": erased},
             f"{key}: no account (purged already); its delivery history on this node "
             f"erased ({erased} rows)")
        return 0
    erased = erase_history(settings.queue_path, key, settings.busy_timeout)
    emit(args, {"purged": key, "account": True, "history_rows": erased},
         f"purged {key}: mail to it now gets 550 5.1.1 user unknown; its delivery history "
         f"on this node erased ({erased} rows)")
    return 0


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    row = open_directory(settings).require(address_key(args.address, settings))
    emit(args, account_doc(row), "\n".join([
        account_line(row), *target_lines(row),
        f"created {iso(row.created_at)}, updated {iso(row.updated_at)}; "
        f"{mail_now(row, settings)}"]))
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    account_state = target_state = None
    if args.state in {s.value for s in AccountState}:
        account_state = AccountState(args.state)
    elif args.state:
        target_state = TargetState(args.state)
    rows = list(open_directory(settings).accounts(account_state, args.with_redirect,
                                                  target_state))
    emit(args, {"accounts": [account_doc(r) for r in rows], "count": len(rows)},
         "\n".join([account_line(r) for r in rows] + [f"-- {len(rows)} account(s)"]))
    return 0


def cmd_history(args: argparse.Namespace, settings: Settings) -> int:
    key = address_key(args.address, settings)
    directory = open_directory(settings)
    entries = directory.history(key)
    if not entries and directory.get(key) is None:
        raise CliError(f"{key}: no such account and no history (purged accounts have none)")
    for entry in entries:
        entry["at"] = iso(entry["at"])
    lines = [f"{e['at']}\t{e['actor']}\t{e['action']}\t{_values(e['old'])} -> "
             f"{_values(e['new'])}" for e in entries]
    emit(args, {"address": key, "history": entries}, "\n".join(lines) or "no history")
    return 0


def _values(doc: dict[str, Any] | None) -> str:
    """An audit entry's values in one short line: an account's state and targets (or, in
    entries made before targets existed, its redirect), or one target's state."""
    if doc is None:
        return "-"
    if "target" in doc:
        extra = "".join(f" {key}={doc[key]}" for key in ("client", "sender", "ignored",
                                                           "failures") if doc.get(key))
        return f"{doc['target']}:{doc['state'] or 'removed'}{extra}"
    if "targets" in doc:
        return f"{doc['state']},{'+'.join(doc['targets']) or '-'}"
    return f"{doc['state']},{doc.get('redirect') or '-'}"


# --- parsers --------------------------------------------------------------------------


def register(sub: Any) -> None:
    acc = add_group(sub, "account", "manage the directory of addresses",
                    f"forwarder account show {EXAMPLE_ADDRESS}")
    p = add_command(acc, "add", cmd_add, "add a new enrolled student (state active)",
                    f"forwarder account add {EXAMPLE_ADDRESS} --redirect marie@example.org",
                    json_flag=True)
    p.add_argument("address")
    p.add_argument("--redirect", metavar="TARGET",
                   help="forwarding address once deleted (a notice is sent to it)")
    add_dns_options(p)
    p = add_command(acc, "redirect", cmd_redirect,
                    f"declare or change the targets (up to {MAX_TARGETS}, in order); new "
                    "ones are pending and get a notice, those kept keep their state",
                    f"forwarder account redirect {EXAMPLE_ADDRESS} marie@example.org "
                    "marie.curie@work.example", json_flag=True)
    p.add_argument("address")
    p.add_argument("targets", nargs="+", metavar="TARGET")
    add_dns_options(p)
    p = add_command(acc, "target", cmd_target,
                    "switch one target on or off (on declares it again: a refused, "
                    "failing or pending target gets a new notice)",
                    f"forwarder account target {EXAMPLE_ADDRESS} marie@example.org off",
                    json_flag=True)
    p.add_argument("address")
    p.add_argument("target")
    p.add_argument("switch", choices=["on", "off"])
    for name, handler, text in (
        ("unredirect", cmd_unredirect, "withdraw every target"),
        ("delete", cmd_delete, "the school account is deleted (the targets are kept: mail "
                               "is then forwarded, or refused if there is none on)"),
        ("show", cmd_show, "show one account, each target with its state and why"),
        ("history", cmd_history, "show the audit trail of one account (who, when, what)"),
    ):
        p = add_command(acc, name, handler, text,
                        f"forwarder account {name} {EXAMPLE_ADDRESS}", json_flag=True)
        p.add_argument("address")
    p = add_command(acc, "purge", cmd_purge,
                    "erase an account and the personal data in its history (GDPR); mail to "
                    "it then gets 'user unknown'",
                    f"forwarder account purge {EXAMPLE_ADDRESS} --yes", json_flag=True)
    p.add_argument("address")
    p.add_argument("--yes", action="store_true", help="confirm the erasure")
    _register_list(acc)
    cli_import.register(acc)


def _register_list(acc: Any) -> None:
    p = add_command(acc, "list", cmd_list, "list accounts",
                    "forwarder account list --state failing", json_flag=True)
    p.add_argument("--state", choices=[s.value for s in AccountState]
                   + [s.value for s in TargetState],
                   help="accounts in this state, or with a target in this state")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--with-redirect", dest="with_redirect", action="store_const",
                       const=True, default=None, help="only accounts with a target")
    group.add_argument("--without-redirect", dest="with_redirect", action="store_const",
                       const=False, help="only accounts without one")
