"""The PostgreSQL directory (several nodes, docs/cluster.md) on a real server: the same
commands give the same output as on SQLite; the audit is append-only in the database; an
import is all or nothing; migrations run once however many nodes start together; a write
while PostgreSQL is down fails with one line; `forwarder check` reports the node's copy."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from forwarder.cli import main
from forwarder.clock import FakeClock
from forwarder.directory import DirectoryError, ImportRow, replica
from forwarder.directory.cluster import Replicator
from forwarder.directory.pgadmin import PgDirectory
from forwarder.directory.pgconn import connect_kwargs
from forwarder.directory.pgschema import SCHEMA_VERSION, open_directory_db, schema_version
from forwarder.directory.pgstores import PgKeyStore
from forwarder.directory.replica import ReplicaFile
from forwarder.directory.upkeep import Upkeep
from forwarder.policy import AccountState
from tests.conftest import DOMAIN, make_settings
from tests.pgcluster import PASSWORD, PgCluster

SCRIPT = [
    ("account", "add", f"anne.martin@{DOMAIN}", "--redirect", "anne@gmail.example"),
    ("account", "add", f"bob.durand@{DOMAIN}"),
    ("account", "redirect", f"bob.durand@{DOMAIN}", "bob@outlook.example",
     "bob@orange.example"),
    ("account", "target", f"bob.durand@{DOMAIN}", "bob@orange.example", "off"),
    ("account", "delete", f"anne.martin@{DOMAIN}"),
    ("account", "add", f"anne.martin@{DOMAIN}"),  # refused: it exists
    ("account", "list"),
    ("account", "list", "--json"),
    ("account", "show", f"bob.durand@{DOMAIN}", "--json"),
    ("account", "unredirect", f"bob.durand@{DOMAIN}"),
    ("account", "purge", f"bob.durand@{DOMAIN}", "--yes"),
    ("account", "show", f"bob.durand@{DOMAIN}"),  # refused: purged
    ("lookup", f"anne.martin@{DOMAIN}"),
    ("report", "senders", "--json"),
]


def run_script(capsys: pytest.CaptureFixture[str], state_dir: Path,
               config: Path | None) -> list[tuple[int, str, str]]:
    results = []
    for argv in SCRIPT:
        extra = ["--no-dns-check"] if argv[1] in ("add", "redirect") else []
        if config is not None:
            extra += ["--config", str(config)]
        capsys.readouterr()
        code = main([*argv, *extra, "--state-dir", str(state_dir)])
        out, err = capsys.readouterr()
        results.append((code, _timeless(out), _timeless(err)))
    return results


def _timeless(text: str) -> str:
    """Times differ between two runs; everything else must not."""
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z?", "TIME", text)
    return re.sub(r'"(created_at|updated_at|declared_at|changed_at)": [0-9.e+]+', r'"\1": T',
                  text)


def pg_config(path: Path, url: str) -> Path:
    path.write_text(f'directory_url = "{url}"\ndirectory_password = "{PASSWORD}"\n'
                    f'domains = ["{DOMAIN}"]\n')
    path.chmod(0o600)
    return path


def test_same_commands_same_output_on_both_backends(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sqlite = run_script(capsys, tmp_path / "sqlite", None)
    postgres = run_script(capsys, tmp_path / "pg", pg_config(tmp_path / "pg.toml", pg_url))
    assert [code for code, _, _ in sqlite] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0]
    assert postgres == sqlite
    # Nothing of the directory went to the SQLite file on the PostgreSQL node.
    assert not (tmp_path / "pg" / "directory.sqlite3").exists()


def test_audit_is_append_only_in_the_database(pg_url: str) -> None:
    directory = PgDirectory(pg_url, PASSWORD, actor="test")
    try:
        directory.add(f"anne.martin@{DOMAIN}", ["anne@gmail.example"])
    finally:
        directory.close()
    with psycopg.connect(pg_url, password=PASSWORD, autocommit=True) as conn:
        for statement in ("UPDATE audit SET actor = 'someone else'", "DELETE FROM audit",
                          "TRUNCATE audit"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(statement)
        assert conn.execute("SELECT actor FROM audit").fetchall() == [("test",)]


def test_import_is_all_or_nothing(pg_url: str) -> None:
    directory = PgDirectory(pg_url, PASSWORD, actor="test")
    rows = [ImportRow(n, f"student{n}@{DOMAIN}", (f"s{n}@gmail.example",),
                      AccountState.ACTIVE) for n in range(2, 502)]
    try:
        # The database itself refuses the 400th row half way through the write.
        directory.pg.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" IF NEW.address = 'student401@{DOMAIN}' THEN RAISE EXCEPTION 'disk full';"
            " END IF; RETURN NEW; END $$")
        directory.pg.execute("CREATE TRIGGER refuse BEFORE INSERT ON accounts"
                             " FOR EACH ROW EXECUTE FUNCTION refuse()")
        with pytest.raises(OSError, match="disk full"):
            directory.import_rows(rows)
        assert list(directory.accounts()) == []
        directory.pg.execute("DROP TRIGGER refuse ON accounts")
        assert directory.import_rows(rows).report.added == 500
        assert directory.import_rows(rows).report.unchanged == 500
        assert len(list(directory.accounts())) == 500
    finally:
        directory.close()


def test_migrations_run_once_when_nodes_start_together(pg_url: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            open_directory_db(pg_url, PASSWORD).close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    conn = open_directory_db(pg_url, PASSWORD)
    try:
        assert schema_version(conn) == SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1
    finally:
        conn.close()


def test_write_while_postgresql_is_down_fails_with_one_line(
    tmp_path: Path, pg_cluster: PgCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql://forwarder@127.0.0.1:{pg_cluster.port + 1}/nowhere"
    config = pg_config(tmp_path / "pg.toml", url)
    capsys.readouterr()
    code = main(["account", "add", f"anne.martin@{DOMAIN}", "--no-dns-check",
                 "--config", str(config), "--state-dir", str(tmp_path / "state")])
    _, err = capsys.readouterr()
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "PostgreSQL directory" in err


def test_duplicate_account_refused_on_postgresql_too(pg_url: str) -> None:
    directory = PgDirectory(pg_url, PASSWORD, actor="test")
    try:
        directory.add(f"anne.martin@{DOMAIN}")
        with pytest.raises(DirectoryError, match="already exists"):
            directory.add(f"anne.martin@{DOMAIN}")
    finally:
        directory.close()


def test_check_reports_postgresql_and_the_copy(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = pg_config(tmp_path / "pg.toml", pg_url)
    state = tmp_path / "state"
    state.mkdir()
    capsys.readouterr()
    main(["check", "--json", "--config", str(config), "--state-dir", str(state)])
    doc = json.loads(capsys.readouterr().out)
    assert doc["directory_staleness_seconds"] is None
    assert any("PostgreSQL directory reachable" in note for note in doc["notes"])
    config.chmod(0o644)
    main(["check", "--json", "--config", str(config), "--state-dir", str(state)])
    doc = json.loads(capsys.readouterr().out)
    assert any("directory_password" in problem for problem in doc["problems"])


def copy_of(state: Path) -> dict[str, list[str]]:
    """The node's copy: each account's state and targets in order."""
    conn = sqlite3.connect(state / "directory-replica.sqlite3")
    try:
        found: dict[str, list[str]] = {}
        for address, account_state in conn.execute("SELECT address, state FROM accounts"):
            found[address] = [account_state]
        for address, target in conn.execute("SELECT address, target FROM targets"
                                            " ORDER BY address, position"):
            found[address].append(target)
        return found
    finally:
        conn.close()


def prune_log(directory: PgDirectory) -> None:
    """The whole change log pruned, as docs/cluster.md shows it."""
    directory.pg.execute(
        "WITH gone AS (DELETE FROM changes RETURNING version) UPDATE meta SET value ="
        " greatest(value::bigint, (SELECT coalesce(max(version), 0) FROM gone))::text"
        " WHERE name = 'pruned_through'")


async def test_the_copy_replays_changes_and_starts_over_past_a_pruned_log(
    tmp_path: Path, pg_url: str, clock: FakeClock
) -> None:
    settings = make_settings(tmp_path / "node", directory_url=pg_url,
                             directory_password=PASSWORD)
    anne, bob = f"anne.martin@{DOMAIN}", f"bob.durand@{DOMAIN}"
    directory = PgDirectory(pg_url, PASSWORD, actor="test")
    replicator = Replicator(settings, clock)
    conn = await replicator.connect()
    try:
        directory.add(anne, ["a1@gmail.example", "a2@gmail.example"])
        await replicator.sync(conn)
        assert copy_of(settings.state_dir) == {anne: ["active", "a1@gmail.example",
                                                      "a2@gmail.example"]}
        # Replayed: a new order, a target removed and one added, an account deleted.
        directory.set_targets(anne, ["a2@gmail.example", "a3@gmail.example"])
        directory.add(bob)
        directory.delete(anne)
        assert await replicator.sync(conn) > 0
        assert copy_of(settings.state_dir) == {
            anne: ["deleted", "a2@gmail.example", "a3@gmail.example"], bob: ["active"]}
        # A success refreshed (thousands a minute) changes nothing a copy reads.
        Upkeep(directory.pg).refresh_successes([(anne, "a2@gmail.example", 2e9)])
        assert await replicator.sync(conn) == 0
        # The log pruned past this node's version: the copy is made again from scratch.
        directory.purge(anne)
        prune_log(directory)
        await replicator.sync(conn)
        assert copy_of(settings.state_dir) == {bob: ["active"]}
        assert await replicator.sync(conn) == 0  # current: nothing to do
    finally:
        await conn.close()
        await replicator.close()
        directory.close()


async def test_srs_keys_come_back_after_the_connection_is_cut(pg_url: str) -> None:
    """A cut connection fails the call that finds it, as an OSError (the caller defers,
    never a 5xx), and the next call opens a new one (srsstore.ThreadKeyStore's thread)."""
    store = PgKeyStore(pg_url, PASSWORD)
    sender = "a" * 50 + "@" + "c" * 40 + ".example"
    try:
        key = await store.put(sender, 1.0)
        with psycopg.connect(pg_url, password=PASSWORD, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        with pytest.raises(OSError):
            await store.get(key)
        assert await store.get(key) == sender
        assert await store.purge(2.0) == 1
        assert await store.get(key) is None
    finally:
        await store.close()


class Inserts:
    """ReplicaFile.insert, counted: which table's chunk, how many rows; `then` runs after
    a chunk is written (in the replicator's thread)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[tuple[str, int]] = []
        self.then: Callable[[], object] = lambda: None
        real = ReplicaFile.insert

        def insert(file: ReplicaFile, table: str, rows: list[tuple[Any, ...]]) -> None:
            real(file, table, rows)
            self.seen.append((table, len(rows)))
            self.then()

        monkeypatch.setattr(ReplicaFile, "insert", insert)


@dataclass
class Node:
    """A node's replicator on its own connection, and an admin's PgDirectory."""

    state: Path
    directory: PgDirectory
    replicator: Replicator
    conn: psycopg.AsyncConnection[Any]


@pytest.fixture
async def node(tmp_path: Path, pg_url: str, clock: FakeClock) -> AsyncIterator[Node]:
    settings = make_settings(tmp_path / "node", directory_url=pg_url,
                             directory_password=PASSWORD)
    directory = PgDirectory(pg_url, PASSWORD, actor="test")
    replicator = Replicator(settings, clock)
    found = Node(settings.state_dir, directory, replicator, await replicator.connect())
    try:
        yield found
    finally:
        await found.conn.close()
        await replicator.close()
        directory.close()


async def test_a_full_copy_is_streamed_and_all_or_nothing(
    node: Node, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full copy moves COPY_CHUNK rows at a time from a cursor on the server into one
    SQLite transaction: a node never holds the whole directory in memory, and a copy cut
    short (its PostgreSQL connection killed half way) leaves the old copy whole, which the
    next sync, on a new connection, replaces."""
    monkeypatch.setattr(replica, "COPY_CHUNK", 3)
    inserts = Inserts(monkeypatch)
    people = {f"p{i}.nom@{DOMAIN}": ["active", f"p{i}@gmail.example"] for i in range(8)}
    for address, (_, target) in people.items():
        node.directory.add(address, [target])
    await node.replicator.sync(node.conn)  # no copy yet: a full one
    assert copy_of(node.state) == people
    assert inserts.seen == [("accounts", 3), ("accounts", 3), ("accounts", 2),
                            ("targets", 3), ("targets", 3), ("targets", 2)]
    version = node.replicator.version

    node.directory.add(f"new.one@{DOMAIN}", ["new@gmail.example"])
    prune_log(node.directory)  # this node is now behind the log: a full copy again

    def cut() -> None:
        with psycopg.connect(**connect_kwargs(pg_url, PASSWORD)) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (node.conn.info.backend_pid,))

    inserts.then = cut
    with pytest.raises(psycopg.OperationalError):
        await node.replicator.sync(node.conn)
    assert inserts.seen[6:] == [("accounts", 3)]  # cut after its first chunk
    assert copy_of(node.state) == people  # the old copy, whole
    assert (await node.replicator.load()).version == version

    inserts.then = lambda: None
    await node.conn.close()
    node.conn = await node.replicator.connect()
    await node.replicator.sync(node.conn)
    assert copy_of(node.state) == {**people, f"new.one@{DOMAIN}": ["active", "new@gmail.example"]}


async def test_a_copy_far_behind_is_made_again_rather_than_replayed(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay reads every changed row in one piece: past REPLAY_MAX versions behind, the
    copy is streamed in full instead."""
    monkeypatch.setattr(replica, "REPLAY_MAX", 3)
    inserts = Inserts(monkeypatch)
    node.directory.add(f"anne.martin@{DOMAIN}")
    await node.replicator.sync(node.conn)
    inserts.seen.clear()
    node.directory.add(f"bob.durand@{DOMAIN}")  # one version: replayed
    await node.replicator.sync(node.conn)
    assert inserts.seen == []
    for name in ("carl", "dina", "emil", "fred"):  # four more: past the bound
        node.directory.add(f"{name}.nom@{DOMAIN}")
    await node.replicator.sync(node.conn)
    assert inserts.seen == [("accounts", 6)]
    assert len(copy_of(node.state)) == 6


async def test_the_change_log_is_pruned_hourly_past_its_retention(
    node: Node, clock: FakeClock
) -> None:
    """The main process removes the change log's entries older than
    `directory_log_retention` (30 days by default), once an hour, and moves
    `pruned_through` past them (a node behind that takes a full copy, above); the node
    that pruned stays current."""
    pg = node.directory.pg

    def log() -> tuple[list[int], int]:
        versions = [row[0] for row in pg.execute(
            "SELECT version FROM changes ORDER BY version").fetchall()]
        pruned = pg.execute("SELECT value FROM meta WHERE name = 'pruned_through'").fetchone()
        return versions, int(pruned[0])

    def age(through: int, days: int) -> None:
        pg.execute("UPDATE changes SET at = now() - make_interval(days => ?)"
                   " WHERE version <= ?", (days, through))

    node.directory.add(f"anne.martin@{DOMAIN}", ["anne@gmail.example"])
    old = log()[0]
    node.directory.add(f"bob.durand@{DOMAIN}", ["bob@gmail.example"])
    await node.replicator.sync(node.conn)
    age(max(old), 40)
    await node.replicator.prune_due(node.conn)
    versions, pruned = log()
    assert pruned == max(old) and versions and min(versions) > max(old)
    age(max(versions), 31)  # old enough now, but an hour has not passed
    await node.replicator.prune_due(node.conn)
    assert log()[0] == versions
    clock.advance(3600)
    await node.replicator.prune_due(node.conn)
    assert log() == ([], max(versions))
    assert await node.replicator.sync(node.conn) == 0  # this node was current
    assert set(copy_of(node.state)) == {f"anne.martin@{DOMAIN}", f"bob.durand@{DOMAIN}"}


async def test_a_full_copy_cancelled_half_way_leaves_the_old_copy_and_a_usable_connection(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon stopping during a full copy: the copy's transaction is rolled back, its
    cursor closed with the snapshot, and the same connection syncs again afterwards."""
    monkeypatch.setattr(replica, "COPY_CHUNK", 2)
    inserts = Inserts(monkeypatch)
    for i in range(5):
        node.directory.add(f"p{i}.nom@{DOMAIN}")
    await node.replicator.sync(node.conn)
    before = copy_of(node.state)
    node.directory.add(f"new.one@{DOMAIN}")
    prune_log(node.directory)
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(node.replicator.sync(node.conn))
    inserts.then = lambda: loop.call_soon_threadsafe(task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert copy_of(node.state) == before
    inserts.then = lambda: None
    await node.replicator.sync(node.conn)  # the same connection: no cursor or snapshot left
    assert len(copy_of(node.state)) == 6
