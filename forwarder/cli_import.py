"""`forwarder account import`: the term-time load of the student records export."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from forwarder.cli_common import (
    CliError,
    add_command,
    add_dns_options,
    emit,
    one_line,
    open_directory,
)
from forwarder.config import Settings
from forwarder.directory import ImportPlan
from forwarder.importer import parse_import
from forwarder.redirects import TargetValidator, check_domains, target_domain


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    path = Path(args.file)
    try:
        parsed = parse_import(path, settings.domains, TargetValidator(settings.domains))
    except OSError as exc:
        raise CliError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    directory = open_directory(settings)
    errors = list(parsed.errors)
    checked: set[str] = set()
    if not args.no_dns_check:
        # Only the targets this import declares are checked: compare with the directory.
        plan = directory.plan_import(parsed.rows)
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

    imported = directory.import_rows(parsed.rows, dry_run=args.dry_run, verify=verify)
    report = imported.report
    # The notices are owed in the directory, committed with the targets; the daemon sends
    # them one every notice_interval (a term's thousands do not go in one burst, and the
    # import writes no mail).
    counts = dict(vars(report))
    notices = counts.pop("declared")
    doc.update(counts, errors=[], notices=notices)
    verb = "would import" if args.dry_run else "imported"
    ignored = (f" (ignored columns: {', '.join(parsed.ignored_columns)})"
               if parsed.ignored_columns else "")
    sent = ""
    if notices:
        pace = settings.targets.notice_interval
        sent = (f"; {notices} new target(s): the daemon sends their notices, one every "
                f"{pace:g} s" if not args.dry_run else f"; {notices} new target(s)")
    emit(args, doc, f"{verb} {len(parsed.rows)} rows{ignored}: {report.added} added, "
         f"{report.changed} changed, {report.deleted} deleted, {report.unchanged} "
         f"unchanged{sent}")
    return 0


def _dns_errors(plan: ImportPlan, settings: Settings, timeout: float) -> list[tuple[int, str]]:
    """One DNS check per distinct domain of the newly declared targets; an error per line."""
    declared = plan.declared()
    problems = check_domains({target_domain(t) for _, t in declared}, settings, timeout)
    return [(line, f"redirect {target}: {problems[target_domain(target)].reason}")
            for line, target in declared if target_domain(target) in problems]


def register(acc: Any) -> None:
    p = add_command(acc, "import", cmd_import,
                    "load the student records export (CSV: email,redirect,status; several "
                    "targets in redirect separated by ';'), all or nothing",
                    "forwarder account import students.csv --dry-run", json_flag=True)
    p.add_argument("file")
    p.add_argument("--dry-run", action="store_true", help="report what would change only")
    add_dns_options(p)
