"""The migration to redirect targets, on a copy of a directory written by the release before
them (tests/fixtures/directory-v3.md says how the file was made)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from forwarder.cli import main
from forwarder.directory import SCHEMA_VERSION, Directory, SqliteDaemonDirectory
from forwarder.policy import Accept, AccountState, Refuse, decide_account
from forwarder.targets import TargetState, TargetView
from tests.conftest import DOMAIN

FIXTURE = Path(__file__).parent / "fixtures" / "directory-v3.sqlite3"
MIGRATED = "declared before confirmation existed (migrated)"


@pytest.fixture
def old_state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(FIXTURE, state / "directory.sqlite3")
    return state


def test_the_fixture_is_the_old_schema() -> None:
    conn = sqlite3.connect(FIXTURE.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        columns = [row[1] for row in conn.execute("PRAGMA table_info(accounts)")]
        assert "redirect" in columns
    finally:
        conn.close()


def test_each_redirect_becomes_one_confirmed_target(old_state: Path) -> None:
    directory = Directory(old_state / "directory.sqlite3", actor="test")
    assert directory.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    found = {row.address.split("@")[0]: (row.state, [(t.target, t.state, t.why, t.confirmed)
                                                     for t in row.targets])
             for row in directory.accounts()}
    assert found == {
        "marie.curie": (AccountState.ACTIVE,
                        [("marie@perso.example", TargetState.CONFIRMED, MIGRATED, True)]),
        "irene.joliot": (AccountState.DELETED, [("Irene.Joliot@perso.example",
                                                 TargetState.CONFIRMED, MIGRATED, True)]),
        "henri.becquerel": (AccountState.DELETED, [("henri@perso.example",
                                                    TargetState.CONFIRMED, MIGRATED, True)]),
        "pierre.curie": (AccountState.ACTIVE, []), "jean.perrin": (AccountState.ACTIVE, []),
        "paul.langevin": (AccountState.DELETED, []), "eve.curie": (AccountState.ACTIVE, []),
    }
    # Declared before: their owners are not asked again.
    owed = directory.conn.execute("SELECT count(*) FROM targets WHERE notice_due IS NOT NULL")
    assert owed.fetchone()[0] == 0
    directory.close()


def test_the_audit_trail_is_kept_and_says_what_the_migration_did(old_state: Path) -> None:
    directory = Directory(old_state / "directory.sqlite3", actor="test")
    history = directory.history(f"irene.joliot@{DOMAIN}")
    assert [(e["actor"], e["action"]) for e in history] == [
        ("registrar", "add"), ("registrar", "redirect"), ("registrar", "delete"),
        ("migration", "migrate")]
    assert history[1]["new"] == {"state": "active", "redirect": "Irene.Joliot@perso.example"}
    assert history[3]["old"] == {"state": "deleted", "redirect": "Irene.Joliot@perso.example"}
    assert history[3]["new"] == {"state": "deleted", "targets": ["Irene.Joliot@perso.example"]}
    purged = directory.conn.execute(
        "SELECT action FROM audit WHERE address = '(purged)' ORDER BY id").fetchall()
    assert purged == [("add",), ("purge",)]
    # Still append-only.
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        directory.conn.execute("DELETE FROM audit")
    directory.close()


def test_the_history_command_reads_both_kinds_of_entry(
    old_state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["account", "redirect", f"irene.joliot@{DOMAIN}", "Irene.Joliot@perso.example",
                 "irene@work.example", "--no-dns-check", "--state-dir", str(old_state)]) == 0
    capsys.readouterr()
    assert main(["account", "history", f"irene.joliot@{DOMAIN}",
                 "--state-dir", str(old_state)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("redirect\tactive,irene@old.example -> "
                             "active,Irene.Joliot@perso.example")
    assert lines[3].endswith("migrate\tdeleted,Irene.Joliot@perso.example -> "
                             "deleted,Irene.Joliot@perso.example")
    assert lines[4].endswith("redirect\tdeleted,Irene.Joliot@perso.example -> "
                             "deleted,Irene.Joliot@perso.example+irene@work.example")


async def test_the_daemon_forwards_to_the_migrated_targets(old_state: Path) -> None:
    reader = await SqliteDaemonDirectory.open(old_state / "directory.sqlite3", 1.0)
    try:
        irene = await reader.lookup(f"irene.joliot@{DOMAIN}")
        assert irene is not None and irene.targets == (
            TargetView("Irene.Joliot@perso.example", TargetState.CONFIRMED),)
        verdict = decide_account(irene, (DOMAIN,), True)
        assert isinstance(verdict, Accept) and verdict.targets == ("Irene.Joliot@perso.example",)
        paul = decide_account(await reader.lookup(f"paul.langevin@{DOMAIN}"), (DOMAIN,), True)
        assert isinstance(paul, Refuse) and paul.reason == "closed"
        assert await reader.claim_notices(10, 2e9) == []
    finally:
        await reader.close()
