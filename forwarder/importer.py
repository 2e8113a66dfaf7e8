"""Reading the student-records export (CSV) into directory rows.

PRODUCT.md's format is UTF-8 with a header `email,redirect,status`. Real exports also come
with a UTF-8 byte order mark, `;` separators (spreadsheets in a French locale), upper-case
addresses, spaces around fields and Windows line ends; all of these are accepted.
Every bad line is reported with its number and reason, and then nothing is written.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from forwarder.addresses import AddressError, is_own_domain, parse_address
from forwarder.directory import ImportRow
from forwarder.policy import AccountState

HEADER = ("email", "redirect", "status")


@dataclass
class ParsedImport:
    rows: list[ImportRow] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)


def _reader(text: str) -> csv.reader:  # type: ignore[valid-type]
    first = text.split("\n", 1)[0]
    delimiter = ";" if first.count(";") > first.count(",") else ","
    return csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)


def parse_import(
    path: Path,
    domains: tuple[str, ...],
    validate_target: Callable[[str], str],
) -> ParsedImport:
    """Parse the whole file; `validate_target` returns a normalised target or raises."""
    result = ParsedImport()
    try:
        # utf-8-sig drops a byte order mark if there is one.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        result.errors.append((0, f"file is not UTF-8 ({exc.reason} at byte {exc.start})"))
        return result
    reader = _reader(text)
    header = next(reader, None)
    if header is None or tuple(h.strip().lower() for h in header) != HEADER:
        result.errors.append((1, "header must be: email,redirect,status"))
        return result
    seen: dict[str, int] = {}
    for fields in reader:
        line = reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue
        try:
            row = _parse_row(fields, line, domains, validate_target)
        except AddressError as exc:
            result.errors.append((line, str(exc)))
            continue
        if row.address in seen:
            result.errors.append((line, f"{row.address} already given on line {seen[row.address]}"))
            continue
        seen[row.address] = line
        result.rows.append(row)
    return result


def _parse_row(
    fields: list[str], line: int, domains: tuple[str, ...],
    validate_target: Callable[[str], str],
) -> ImportRow:
    if len(fields) != 3:
        raise AddressError(f"expected 3 fields (email,redirect,status), found {len(fields)}")
    email, redirect, status = (f.strip() for f in fields)
    try:
        address = parse_address(email)
    except AddressError as exc:
        raise AddressError(f"email {email!r}: {exc}") from exc
    if not is_own_domain(address.domain, domains):
        raise AddressError(f"email {email!r} is not in our domains ({', '.join(domains)})")
    try:
        state = AccountState(status.lower())
    except ValueError:
        raise AddressError(f"status {status!r} must be 'active' or 'deleted'") from None
    target = None
    if redirect:
        try:
            target = validate_target(redirect)
        except AddressError as exc:
            raise AddressError(f"redirect {redirect!r}: {exc}") from exc
    return ImportRow(line, address.key, target, state)
