"""`forwarder account ...`: the directory of addresses, its audit trail, the term import."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from forwarder.addresses import AddressError
from forwarder.cli_common import (
    CliError,
    add_command,
    add_dns_options,
    add_group,
    address_key,
    emit,
    iso,
    one_line,
    open_directory,
)
from forwarder.config import Settings
from forwarder.directory import AccountRow, DirectoryError, ImportPlan
from forwarder.history.store import erase as erase_history
from forwarder.importer import parse_import
from forwarder.policy import AccountState
from forwarder.redirects import TargetValidator, check_domains, check_target, target_domain

EXAMPLE_ADDRESS = "marie.curie@sigma-clermont.fr"


def account_doc(row: AccountRow) -> dict[str, Any]:
    return {"address": row.address, "state": row.state.value, "redirect": row.redirect,
            "created_at": iso(row.created_at), "updated_at": iso(row.updated_at)}


def _line(row: AccountRow) -> str:
    return f"{row.address}\t{row.state.value}\t{row.redirect or '-'}"


def _mail_now(row: AccountRow) -> str:
    """What mail to the account gets after a change, in the admin's words."""
    if row.state is AccountState.ACTIVE:
        return "mail goes to the school mailbox"
    if row.redirect:
        return f"mail is forwarded to {row.redirect}"
    return "mail is refused (550 5.1.1 address closed, no forwarding address declared)"


def validated_target(text: str, args: argparse.Namespace, settings: Settings) -> str:
    """The target normalised, or CliError: syntax first, then (unless --no-dns-check) DNS."""
    try:
        target = check_target(text, settings.domains)
    except AddressError as exc:
        raise CliError(f"redirect target {text!r} refused: {exc}") from exc
    if not args.no_dns_check:
        problem = check_domains([target_domain(target)], settings, args.dns_timeout)
        for found in problem.values():
            verb = "not checked" if found.temporary else "refused"
            raise CliError(f"redirect target {target} {verb}: {found.reason}")
    return target


def cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    key = address_key(args.address, settings)
    target = validated_target(args.redirect, args, settings) if args.redirect else None
    row = open_directory(settings).add(key, target)
    emit(args, account_doc(row), f"added {_line(row)}")
    return 0


def cmd_redirect(args: argparse.Namespace, settings: Settings) -> int:
    key = address_key(args.address, settings)
    directory = open_directory(settings)
    directory.require(key)  # an unknown address is refused before any DNS wait
    row = directory.set_redirect(key, validated_target(args.target, args, settings))
    emit(args, account_doc(row), f"redirected {_line(row)}; {_mail_now(row)}")
    return 0


def cmd_unredirect(args: argparse.Namespace, settings: Settings) -> int:
    row = open_directory(settings).set_redirect(address_key(args.address, settings), None)
    emit(args, account_doc(row), f"unredirected {_line(row)}; {_mail_now(row)}")
    return 0


def cmd_delete(args: argparse.Namespace, settings: Settings) -> int:
    row = open_directory(settings).delete(address_key(args.address, settings))
    emit(args, account_doc(row), f"deleted {_line(row)}; {_mail_now(row)}")
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
    emit(args, account_doc(row), f"{_line(row)}\ncreated {iso(row.created_at)}, updated "
                                 f"{iso(row.updated_at)}; {_mail_now(row)}")
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    state = AccountState(args.state) if args.state else None
    rows = list(open_directory(settings).accounts(state, args.with_redirect))
    emit(args, {"accounts": [account_doc(r) for r in rows], "count": len(rows)},
         "\n".join([_line(r) for r in rows] + [f"-- {len(rows)} account(s)"]))
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
    if doc is None:
        return "-"
    return f"{doc['state']},{doc['redirect'] or '-'}"


# --- import ---------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    path = Path(args.file)
    try:
        parsed = parse_import(path, settings.domains, TargetValidator(settings.domains))
    except OSError as exc:
        raise CliError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    directory = open_directory(settings)
    plan = directory.plan_import(parsed.rows)
    errors = list(parsed.errors)
    checked: set[str] = set()
    if not args.no_dns_check:
        checked = plan.new_targets()
        errors += _dns_errors(plan, settings, args.dns_timeout)
    doc: dict[str, Any] = {"file": str(path), "dry_run": args.dry_run, "rows": len(parsed.rows),
                           "ignored_columns": parsed.ignored_columns,
                           "dns_checked_targets": len(checked)}
    if errors:
        errors.sort()
        for line, reason in errors:
            print(f"{path}:{line}: {one_line(reason)}", file=sys.stderr)
        doc["errors"] = [{"line": line, "reason": reason} for line, reason in errors]
        raise CliError(f"{len(errors)} bad line(s) in {path}; nothing was imported", doc)

    def verify(current: ImportPlan) -> None:
        # Another admin may have changed the directory since the DNS check.
        if not args.no_dns_check and not current.new_targets() <= checked:
            raise CliError("the directory changed during the import; run it again")

    report = directory.import_rows(parsed.rows, dry_run=args.dry_run, verify=verify)
    doc.update(vars(report), errors=[])
    verb = "would import" if args.dry_run else "imported"
    ignored = (f" (ignored columns: {', '.join(parsed.ignored_columns)})"
               if parsed.ignored_columns else "")
    emit(args, doc, f"{verb} {len(parsed.rows)} rows{ignored}: {report.added} added, "
         f"{report.changed} changed, {report.deleted} deleted, {report.unchanged} unchanged")
    return 0


def _dns_errors(plan: ImportPlan, settings: Settings, timeout: float) -> list[tuple[int, str]]:
    """One DNS check per distinct domain of the newly declared targets; an error per line."""
    declared = plan.declared()
    problems = check_domains({target_domain(t) for _, t in declared}, settings, timeout)
    return [(line, f"redirect {target}: {problems[target_domain(target)].reason}")
            for line, target in declared if target_domain(target) in problems]


# --- parsers --------------------------------------------------------------------------


def register(sub: Any) -> None:
    acc = add_group(sub, "account", "manage the directory of addresses",
                    f"forwarder account show {EXAMPLE_ADDRESS}")
    p = add_command(acc, "add", cmd_add, "add a new enrolled student (state active)",
                    f"forwarder account add {EXAMPLE_ADDRESS} --redirect marie@example.org",
                    json_flag=True)
    p.add_argument("address")
    p.add_argument("--redirect", metavar="TARGET", help="forwarding address once deleted")
    add_dns_options(p)
    p = add_command(acc, "redirect", cmd_redirect, "declare or change the redirect",
                    f"forwarder account redirect {EXAMPLE_ADDRESS} marie@example.org",
                    json_flag=True)
    p.add_argument("address")
    p.add_argument("target")
    add_dns_options(p)
    for name, handler, text in (
        ("unredirect", cmd_unredirect, "withdraw the redirect"),
        ("delete", cmd_delete, "the school account is deleted (the redirect is kept: mail "
                               "is then forwarded, or refused if there is none)"),
        ("show", cmd_show, "show one account"),
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
    p = add_command(acc, "import", cmd_import,
                    "load the student records export (CSV: email,redirect,status), "
                    "all or nothing",
                    "forwarder account import students.csv --dry-run", json_flag=True)
    p.add_argument("file")
    p.add_argument("--dry-run", action="store_true", help="report what would change only")
    add_dns_options(p)


def _register_list(acc: Any) -> None:
    p = add_command(acc, "list", cmd_list, "list accounts",
                    "forwarder account list --state deleted --without-redirect", json_flag=True)
    p.add_argument("--state", choices=[s.value for s in AccountState])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--with-redirect", dest="with_redirect", action="store_const",
                       const=True, default=None, help="only accounts with a redirect")
    group.add_argument("--without-redirect", dest="with_redirect", action="store_const",
                       const=False, help="only accounts without one")
