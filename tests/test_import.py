"""`forwarder account import`: the student-records export, as real exports come."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from forwarder.addresses import AddressError
from forwarder.cli import main
from forwarder.directory import Directory
from forwarder.importer import parse_import
from forwarder.redirects import TargetValidator, check_target
from tests.conftest import DOMAIN
from tests.dnsserver import DnsServer


@pytest.fixture(autouse=True)
def _no_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORWARDER_CONFIG", raising=False)


def forwarder(capsys: pytest.CaptureFixture[str], state_dir: Path,
              *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--state-dir", str(state_dir)])
    out, err = capsys.readouterr()
    return code, out, err


def accounts(state_dir: Path) -> list[tuple[str, str, str | None]]:
    """(address, state, targets joined by ';' or None), as the directory holds them."""
    directory = Directory(state_dir / "directory.sqlite3", actor="test")
    try:
        return [(row.address, row.state.value,
                 ";".join(t.target for t in row.targets) or None)
                for row in directory.accounts()]
    finally:
        directory.close()


GOOD = (
    "email,redirect,status\n"
    f"marie.curie@{DOMAIN},marie@perso.example,deleted\n"
    f"pierre.curie@{DOMAIN},,active\n"
    f"irene.joliot@{DOMAIN},irene@perso.example,active\n"
)


def test_import_then_reimport_is_idempotent(
    tmp_path: Path, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "students.csv"
    csv.write_text(GOOD)
    code, out, _ = forwarder(capsys, state_dir, "account", "import", str(csv),
                             "--no-dns-check", "--json")
    doc = json.loads(out)
    assert code == 0 and (doc["added"], doc["rows"], doc["errors"]) == (3, 3, [])
    assert accounts(state_dir) == [
        (f"irene.joliot@{DOMAIN}", "active", "irene@perso.example"),
        (f"marie.curie@{DOMAIN}", "deleted", "marie@perso.example"),
        (f"pierre.curie@{DOMAIN}", "active", None)]
    code, out, _ = forwarder(capsys, state_dir, "account", "import", str(csv), "--no-dns-check")
    assert code == 0 and "0 added, 0 changed, 0 deleted, 3 unchanged" in out
    # Next term: Irene graduates, Pierre declares a redirect, a new student arrives.
    csv.write_text(GOOD.replace("irene@perso.example,active", "irene@perso.example,deleted")
                   .replace(",,active", ",pierre@perso.example,active")
                   + f"eve.curie@{DOMAIN},,active\n")
    code, out, _ = forwarder(capsys, state_dir, "account", "import", str(csv),
                             "--no-dns-check", "--dry-run")
    assert code == 0 and "would import 4 rows: 1 added, 1 changed, 1 deleted, 1 unchanged" in out
    assert len(accounts(state_dir)) == 3  # a dry run writes nothing
    assert forwarder(capsys, state_dir, "account", "import", str(csv), "--no-dns-check")[0] == 0
    assert len(accounts(state_dir)) == 4
    code, out, _ = forwarder(capsys, state_dir, "account", "history", f"irene.joliot@{DOMAIN}",
                             "--json")
    history = json.loads(out)["history"]
    assert [(e["action"], e["new"]["state"]) for e in history] == [
        ("import", "active"), ("import", "deleted")]


def test_real_export_quirks_are_accepted(
    tmp_path: Path, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = ("\ufeff Email ; Redirect ; STATUS ;\r\n"
            f" MARIE.CURIE@SIGMA-CLERMONT.FR ; Marie@Perso.Example ; Deleted ;\r\n"
            f"pierre.curie@{DOMAIN};;active;\r\n"
            ";;;\r\n")
    csv = tmp_path / "export.csv"
    csv.write_bytes(text.encode("utf-8"))
    code, _out, err = forwarder(capsys, state_dir, "account", "import", str(csv),
                               "--no-dns-check")
    assert (code, err) == (0, ""), err
    assert accounts(state_dir) == [(f"marie.curie@{DOMAIN}", "deleted", "Marie@perso.example"),
                                   (f"pierre.curie@{DOMAIN}", "active", None)]


def test_bad_line_7_is_named_and_nothing_is_written(
    tmp_path: Path, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = ["email,redirect,status"] + [
        f"student{i}@{DOMAIN},s{i}@perso.example,deleted" for i in range(2, 12)]
    lines[6] = f"student7@{DOMAIN},s7@@perso.example,deleted"  # line 7 of the file
    lines[9] = f"student2@{DOMAIN},,active"  # line 10: a duplicate of line 2
    csv = tmp_path / "students.csv"
    csv.write_text("\r\n".join(lines) + "\r\n")
    code, out, err = forwarder(capsys, state_dir, "account", "import", str(csv),
                               "--no-dns-check", "--json")
    assert code == 1
    errors = json.loads(out)["errors"]
    assert [e["line"] for e in errors] == [7, 10]
    assert "s7@@perso.example" in errors[0]["reason"] and "line 2" in errors[1]["reason"]
    assert f"{csv}:7: redirect 's7@@perso.example'" in err
    assert err.strip().endswith("2 bad line(s) in " f"{csv}; nothing was imported")
    assert accounts(state_dir) == []


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("someone@other.example,,active", "not in our domains"),
        (f"x@{DOMAIN},,graduated", "status"),
        (f"x@{DOMAIN},loop@{DOMAIN},deleted", "inside our own domain"),
        (f"x@{DOMAIN},\"a@b.example\r\nRCPT TO:<v@x.example>\",deleted", "control characters"),
        (f"x@{DOMAIN},a@b.example", "expected at least 3 fields"),
        (f"postmaster@{DOMAIN},,active", "role account"),
    ],
)
def test_bad_lines(tmp_path: Path, line: str, reason: str) -> None:
    csv = tmp_path / "s.csv"
    csv.write_text(f"email,redirect,status\n{line}\n")
    parsed = parse_import(csv, (DOMAIN,), TargetValidator((DOMAIN,)))
    assert len(parsed.errors) == 1 and parsed.errors[0][0] == 2
    assert reason in parsed.errors[0][1]


def test_bad_header_and_encoding(tmp_path: Path) -> None:
    csv = tmp_path / "s.csv"
    csv.write_text("mail,forward,state\n")
    assert parse_import(csv, (DOMAIN,), TargetValidator((DOMAIN,))).errors[0][0] == 1
    csv.write_bytes(b"email,redirect,status\nelo\xefse@" + DOMAIN.encode() + b",,active\n")
    (error,) = parse_import(csv, (DOMAIN,), TargetValidator((DOMAIN,))).errors
    assert "not UTF-8" in error[1]


@pytest.mark.parametrize("target", [
    "Jean.Dupont@Perso.Example", "jd@perso.example.", "a..b@perso.example", "a.@x.example",
    "jd@-bad.example", "jd@x_y.example", "jd@localhost", "jd@x.invalid", "postmaster@x.example",
    "PostMaster@X.example", "jd+tag@x.example", "j'd@x.example", "jd@123.example",
    "a" * 64 + "@x.example", "a" * 65 + "@x.example", "jd@" + "l" * 64 + ".example",
    "a@" + ".".join(["l" * 60] * 4) + ".example", "jd@xn--bcher-kva.example", "jd@bücher.example",
    "jd@sigma-clermont.fr", "jd@mail.sigma-clermont.fr", "jd%x@y.example", "jd!x@y.example",
    "jd@[127.0.0.1]", "\"jd\"@x.example", "jd@x.example ", " jd@x.example",
])
def test_fast_validator_agrees_with_email_validator(target: str) -> None:
    """The import's cached fast path gives exactly `check_target`'s result or refusal."""
    def outcome(validate: Callable[[str], str]) -> str:
        try:
            return "ok: " + validate(target)
        except AddressError as exc:
            return f"refused: {exc}"

    fast = TargetValidator((DOMAIN,))
    fast("warm@x.example")  # the domain cache is populated by another row first
    assert outcome(fast) == outcome(lambda t: check_target(t, (DOMAIN,)))


async def test_dns_check_once_per_domain_and_errors_per_line(
    tmp_path: Path, state_dir: Path, dns_server: DnsServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dns_server.set_records("perso.example.", "MX", [(10, "mx.perso.example.")])
    dns_server.set_records("other.example.", "A", ["127.0.0.1"])
    rows = [f"s{i}@{DOMAIN},s{i}@{'perso' if i % 2 else 'other'}.example,deleted"
            for i in range(40)]
    csv = tmp_path / "students.csv"
    csv.write_text("\n".join(["email,redirect,status", *rows]) + "\n")
    argv = ["account", "import", str(csv), "--dns-server", f"127.0.0.1:{dns_server.port}",
            "--dns-timeout", "1", "--state-dir", str(state_dir)]
    assert await asyncio.to_thread(main, argv) == 0
    assert len(dns_server.queries_for("perso.example", "MX")) == 1
    assert len(dns_server.queries_for("other.example", "MX")) == 1
    # Unchanged targets are not checked again next term; a new dead domain is refused.
    csv.write_text("\n".join(["email,redirect,status", *rows,
                              f"new@{DOMAIN},new@gone.example,deleted"]) + "\n")
    capsys.readouterr()
    before = len(dns_server.queries)
    assert await asyncio.to_thread(main, argv) == 1
    assert len(dns_server.queries_for("gone.example")) == 1 and \
        len(dns_server.queries) == before + 1
    err = capsys.readouterr().err
    assert f"{csv}:42: redirect new@gone.example: domain gone.example cannot receive mail" in err
    assert len(accounts(state_dir)) == 40


def test_100k_rows_import_whole_and_again_unchanged(
    tmp_path: Path, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A school-sized file, all of it, then the same file again changes nothing. How fast
    is measured by bench/import_cost.py (docs/performance.md), not here."""
    domains = ["gmail.example", "outlook.example", "orange.example"] + [
        f"d{i}.example" for i in range(300)]
    lines = ["email,redirect,status"] + [
        f"prenom{i}.nom{i}@{DOMAIN},Prenom{i}.Nom{i}@{domains[i % len(domains)]},"
        f"{'active' if i % 3 == 0 else 'deleted'}" for i in range(100_000)]
    csv = tmp_path / "students.csv"
    csv.write_text("\r\n".join(lines) + "\r\n")
    code, out, _ = forwarder(capsys, state_dir, "account", "import", str(csv), "--no-dns-check")
    assert code == 0 and "100000 added" in out
    assert len(accounts(state_dir)) == 100_000
    code, out, _ = forwarder(capsys, state_dir, "account", "import", str(csv), "--no-dns-check")
    assert code == 0 and "0 added" in out, out


def test_several_targets_separated_by_semicolons(
    tmp_path: Path, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "students.csv"
    csv.write_text("email,redirect,status\n"
                   f"marie.curie@{DOMAIN},marie@perso.example; marie@work.example ;,deleted\n")
    code, out, _ = forwarder(capsys, state_dir, "account", "import", str(csv),
                             "--no-dns-check", "--json")
    assert code == 0 and json.loads(out)["notices"] == 2
    assert accounts(state_dir) == [
        (f"marie.curie@{DOMAIN}", "deleted", "marie@perso.example;marie@work.example")]
    # Her owner confirms one; the next term's file keeps it and adds a third: kept by value,
    # it keeps its state; only the new one is declared (and owes a notice).
    directory = Directory(state_dir / "directory.sqlite3", actor="test")
    target = directory.require(f"marie.curie@{DOMAIN}").targets[0]
    directory.conn.execute("UPDATE targets SET state = 'confirmed' WHERE id = ?", (target.id,))
    # A French-locale export: ';' between fields, the targets quoted.
    csv.write_text("email;redirect;status\n"
                   f'marie.curie@{DOMAIN};"marie@perso.example;marie@work.example;'
                   'm@third.example";deleted\n')
    code, out, _ = forwarder(capsys, state_dir, "account", "import", str(csv),
                             "--no-dns-check", "--json")
    doc = json.loads(out)
    assert code == 0 and (doc["changed"], doc["notices"]) == (1, 1)
    states = [(t.target, t.state.value)
              for t in directory.require(f"marie.curie@{DOMAIN}").targets]
    assert states == [("marie@perso.example", "confirmed"), ("marie@work.example", "pending"),
                      ("m@third.example", "pending")]
    code, out, _ = forwarder(capsys, state_dir, "account", "import", str(csv),
                             "--no-dns-check", "--json")
    assert code == 0 and (json.loads(out)["unchanged"], json.loads(out)["notices"]) == (1, 0)
    directory.close()


@pytest.mark.parametrize(
    ("cell", "reason"),
    [
        (";".join(f"t{i}@perso.example" for i in range(6)), "at most 5"),
        ("a@perso.example;a@Perso.Example", "given twice"),
        ("a@perso.example;not-an-address", "redirect 'not-an-address'"),
    ],
)
def test_bad_target_lists(tmp_path: Path, cell: str, reason: str) -> None:
    csv = tmp_path / "s.csv"
    csv.write_text(f"email,redirect,status\nx@{DOMAIN},{cell},deleted\n")
    parsed = parse_import(csv, (DOMAIN,), TargetValidator((DOMAIN,)))
    assert len(parsed.errors) == 1 and parsed.errors[0][0] == 2
    assert reason in parsed.errors[0][1]
