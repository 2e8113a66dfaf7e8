"""Reading the student-records export (CSV) into directory rows.

PRODUCT.md's format is UTF-8 with a header `email,redirect,status`; the `redirect` cell
holds up to 5 targets separated by `;` (in a `;`-separated file, quote that cell). Real
exports also come
with a UTF-8 byte order mark, `;` separators (spreadsheets in a French locale), upper-case
addresses, spaces around fields, Windows line ends, columns in another order, extra
columns and empty trailing cells; all of these are accepted (extra columns are ignored and
named in the report). Every bad line is reported with its number and reason, and then
nothing is written.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from forwarder.addresses import AddressError, is_own_domain, parse_address
from forwarder.directory import ImportRow
from forwarder.policy import ROLE_ACCOUNTS, AccountState, is_reserved_local
from forwarder.targets import MAX_TARGETS

HEADER = ("email", "redirect", "status")
_STATES = {s.value: s for s in AccountState}


@dataclass
class ParsedImport:
    rows: list[ImportRow] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)


def _records(text: str) -> Iterator[tuple[int, list[str]]]:
    """(first physical line number, fields) of each record; quoted fields may span lines."""
    first = text.split("\n", 1)[0]
    # A French-locale spreadsheet writes ';'; decide from the header, which has no data.
    delimiter = ";" if first.count(";") > first.count(",") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    start = 1
    for fields in reader:
        yield start, fields
        start = reader.line_num + 1


def _columns(header: list[str], result: ParsedImport) -> tuple[int, int, int] | None:
    names = [h.strip().lower() for h in header]
    missing = [name for name in HEADER if name not in names]
    if missing or any(names.count(name) > 1 for name in HEADER):
        result.errors.append((1, "header must name the columns email,redirect,status once "
                                 f"each (found: {','.join(names)})"))
        return None
    result.ignored_columns = [n for n in names if n and n not in HEADER]
    return names.index("email"), names.index("redirect"), names.index("status")


def parse_import(
    path: Path,
    domains: tuple[str, ...],
    validate_target: Callable[[str], str],
) -> ParsedImport:
    """Parse the whole file; `validate_target` returns a normalised target or raises
    AddressError. Raises OSError if the file cannot be read."""
    result = ParsedImport()
    try:
        # utf-8-sig drops a byte order mark if there is one.
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        result.errors.append((0, f"file is not UTF-8 ({exc.reason} at byte {exc.start}); "
                                 "export it again as CSV UTF-8"))
        return result
    records = _records(text)
    try:
        header = next(records, None)
        columns = None if header is None else _columns(header[1], result)
        if header is None:
            result.errors.append((1, "empty file: expected a header email,redirect,status"))
        if columns is None:
            return result
        _parse_rows(records, columns, domains, validate_target, result)
    except csv.Error as exc:
        result.errors.append((0, f"CSV syntax error: {exc}"))
    return result


def _parse_rows(
    records: Iterator[tuple[int, list[str]]], columns: tuple[int, int, int],
    domains: tuple[str, ...], validate_target: Callable[[str], str], result: ParsedImport,
) -> None:
    seen: dict[str, int] = {}
    width = max(columns) + 1
    for line, fields in records:
        if not any(f.strip() for f in fields):
            continue  # blank lines, and ";;" lines spreadsheets leave at the end
        try:
            if len(fields) < width:
                raise AddressError(f"expected at least {width} fields, found {len(fields)}")
            row = _parse_row([fields[i] for i in columns], line, domains, validate_target)
        except AddressError as exc:
            result.errors.append((line, str(exc)))
            continue
        if row.address in seen:
            result.errors.append((line, f"{row.address} already given on line {seen[row.address]}"))
            continue
        seen[row.address] = line
        result.rows.append(row)


def _parse_row(
    fields: list[str], line: int, domains: tuple[str, ...],
    validate_target: Callable[[str], str],
) -> ImportRow:
    email, redirect, status = (f.strip() for f in fields)
    try:
        address = parse_address(email)
    except AddressError as exc:
        raise AddressError(f"email {email!r}: {exc}") from exc
    if not is_own_domain(address.domain, domains):
        raise AddressError(f"email {email!r} is not in our domains ({', '.join(domains)})")
    if address.local.lower() in ROLE_ACCOUNTS:
        raise AddressError(f"email {email!r} is a role account, not a student")
    if is_reserved_local(address.local):
        raise AddressError(f"email {email!r} is reserved for the notices' reply addresses")
    state = _STATES.get(status.lower())
    if state is None:
        raise AddressError(f"status {status!r} must be 'active' or 'deleted'")
    return ImportRow(line, address.key, _targets(redirect, validate_target), state)


def _targets(cell: str, validate_target: Callable[[str], str]) -> tuple[str, ...]:
    """The `;`-separated targets of a redirect cell, validated, in order (empty items,
    as a trailing `;` leaves, are skipped)."""
    if not cell:
        return ()
    targets: list[str] = []
    for item in cell.split(";") if ";" in cell else (cell,):
        item = item.strip()
        if not item:
            continue
        try:
            target = validate_target(item)
        except AddressError as exc:
            raise AddressError(f"redirect {item!r}: {exc}") from exc
        if target in targets:
            raise AddressError(f"redirect {target} given twice")
        targets.append(target)
    if len(targets) > MAX_TARGETS:
        raise AddressError(f"{len(targets)} redirect targets; at most {MAX_TARGETS} are allowed")
    return tuple(targets)
