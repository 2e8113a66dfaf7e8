"""The directory: migrations, the append-only audit trail, bulk import, the daemon's reader."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from forwarder.directory import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Directory,
    DirectoryError,
    ImportPlan,
    ImportRow,
    SqliteDaemonDirectory,
    count_active,
)
from forwarder.migrations import inspect_database
from forwarder.policy import AccountState
from forwarder.targets import TargetState, TargetView
from tests.conftest import DOMAIN

GRAD = f"jean.dupont@{DOMAIN}"


def test_migrates_an_old_directory_keeping_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "directory.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[0].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(f"INSERT INTO accounts VALUES ('{GRAD}', 'deleted', 'jd@x.example', 0, 0)")
    conn.close()
    directory = Directory(path, actor="test")
    assert directory.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    (target,) = directory.require(GRAD).targets
    assert (target.target, target.state) == ("jd@x.example", TargetState.CONFIRMED)
    directory.set_targets(GRAD, ["new@x.example"])
    assert [e["action"] for e in directory.history(GRAD)] == ["migrate", "redirect"]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "directory.sqlite3"
    Directory(path, actor="test").conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(DirectoryError, match="newer"):
        Directory(path, actor="test")
    assert "newer" in inspect_database(path, SCHEMA_VERSION)[0]


def test_audit_is_append_only_but_purge_erases_personal_data(directory: Directory) -> None:
    directory.add(GRAD, ["jd@x.example"])
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        directory.conn.execute("UPDATE audit SET actor = 'someone else'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        directory.conn.execute("DELETE FROM audit")
    directory.purge(GRAD)
    rows = directory.conn.execute("SELECT actor, action, address, old, new FROM audit").fetchall()
    assert rows == [("test", "add", "(purged)", None, None),
                    ("test", "purge", "(purged)", None, None)]
    with pytest.raises(DirectoryError, match="no such account"):
        directory.purge(GRAD)


def test_writes_record_old_and_new_values(directory: Directory) -> None:
    directory.add(GRAD)
    directory.set_targets(GRAD, ["jd@x.example"])
    directory.set_targets(GRAD, ["jd@x.example"])  # unchanged: no entry
    directory.delete(GRAD)
    history = directory.history(GRAD)
    assert [(e["action"], e["old"], e["new"]) for e in history] == [
        ("add", None, {"state": "active", "targets": []}),
        ("redirect", {"state": "active", "targets": []},
         {"state": "active", "targets": ["jd@x.example"]}),
        ("delete", {"state": "active", "targets": ["jd@x.example"]},
         {"state": "deleted", "targets": ["jd@x.example"]}),
    ]
    assert all(e["actor"] == "test" for e in history)


def rows(*specs: tuple[str, str | None, AccountState]) -> list[ImportRow]:
    return [ImportRow(n + 2, a, (r,) if r else (), s) for n, (a, r, s) in enumerate(specs)]


def test_import_counts_and_all_or_nothing(directory: Directory, state_dir: Path) -> None:
    directory.add(f"a@{DOMAIN}")
    directory.add(f"b@{DOMAIN}", ["b@x.example"])
    batch = rows((f"a@{DOMAIN}", None, AccountState.ACTIVE),
                 (f"b@{DOMAIN}", "b@x.example", AccountState.DELETED),
                 (f"c@{DOMAIN}", "c@x.example", AccountState.ACTIVE),
                 (f"d@{DOMAIN}", None, AccountState.DELETED))
    plan = directory.plan_import(batch)
    assert vars(plan.report) == {"added": 2, "changed": 0, "deleted": 1, "unchanged": 1,
                                 "declared": 1}
    assert plan.new_targets() == {"c@x.example"}  # b's target was declared before

    def refuse(current: ImportPlan) -> None:
        raise DirectoryError("refused")

    with pytest.raises(DirectoryError):
        directory.import_rows(batch, verify=refuse)
    assert [a.address for a in directory.accounts()] == [f"a@{DOMAIN}", f"b@{DOMAIN}"]
    assert count_active(state_dir / "directory.sqlite3") == 2
    imported = directory.import_rows(batch)
    assert (imported.report.added, imported.report.deleted) == (2, 1)
    assert [(d.account, d.target) for d in imported.declared] == [(f"c@{DOMAIN}",
                                                                   "c@x.example")]
    assert count_active(state_dir / "directory.sqlite3") == 2  # a and c
    again = directory.import_rows(batch)
    assert again.report.unchanged == 4 and again.declared == ()


async def test_daemon_reader_sees_admin_changes(directory: Directory, state_dir: Path) -> None:
    reader = await SqliteDaemonDirectory.open(state_dir / "directory.sqlite3", 1.0)
    try:
        assert await reader.lookup(GRAD) is None
        directory.add(GRAD, ["jd@x.example"])
        directory.delete(GRAD)
        account = await reader.lookup(GRAD)
        assert account is not None and account.state is AccountState.DELETED
        assert account.targets == (TargetView("jd@x.example", TargetState.PENDING),)
    finally:
        await reader.close()
