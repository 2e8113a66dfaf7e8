"""The account commands about redirect targets, through the CLI's entry point: declaring
several, switching one, listing by state, showing why, lookup, token secrets, check."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from forwarder.directory import Directory
from tests.conftest import DOMAIN, Run, run_json

GRAD = f"marie.curie@{DOMAIN}"
HOME, WORK, OLD = "marie@perso.example", "marie.curie@work.example", "mc@old.example"


@pytest.fixture(autouse=True)
def _no_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORWARDER_CONFIG", raising=False)


def notices_queued(state_dir: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(state_dir / "queue.sqlite3") as conn:
        return conn.execute("SELECT orig_rcpt, rcpt, route FROM recipients ORDER BY id"
                            ).fetchall()


def test_redirect_declares_several_and_keeps_those_kept(run: Run, state_dir: Path) -> None:
    run("account", "add", GRAD)
    doc = run_json(run, "account", "redirect", GRAD, HOME, OLD, "--no-dns-check")
    assert [(t["target"], t["state"]) for t in doc["targets"]] == [
        (HOME, "pending"), (OLD, "pending")]
    assert doc["notices"] == 2
    assert notices_queued(state_dir) == [(GRAD, HOME, "notice"), (GRAD, OLD, "notice")]
    # The notices are queued: none is owed to the daemon any more.
    with sqlite3.connect(state_dir / "directory.sqlite3") as conn:
        assert conn.execute("SELECT count(*) FROM targets WHERE notice_due IS NOT NULL"
                            ).fetchone()[0] == 0
    directory = Directory(state_dir / "directory.sqlite3", actor="test")
    home_id = directory.require(GRAD).targets[0].id
    directory.conn.execute("UPDATE targets SET state = 'confirmed' WHERE id = ?", (home_id,))
    # New order, one dropped, one added: the kept one keeps its state (and id), no notice.
    doc = run_json(run, "account", "redirect", GRAD, WORK, HOME, "--no-dns-check")
    assert [(t["target"], t["state"]) for t in doc["targets"]] == [
        (WORK, "pending"), (HOME, "confirmed")]
    assert doc["notices"] == 1 and notices_queued(state_dir)[-1] == (GRAD, WORK, "notice")
    assert directory.require(GRAD).targets[1].id == home_id
    code, _, err = run("account", "redirect", GRAD, *(f"t{i}@perso.example" for i in range(6)),
                       "--no-dns-check")
    assert code == 1 and "at most 5" in err
    code, _, err = run("account", "redirect", GRAD, HOME, "marie@PERSO.example",
                       "--no-dns-check")
    assert code == 1 and "given twice" in err
    directory.close()


def test_target_on_off_and_list_by_state(run: Run, state_dir: Path) -> None:
    run("account", "add", GRAD, "--redirect", HOME, "--no-dns-check")
    run("account", "delete", GRAD)
    run("account", "add", f"pierre.curie@{DOMAIN}", "--redirect", WORK, "--no-dns-check")
    doc = run_json(run, "account", "target", GRAD, HOME, "off")
    assert doc["targets"][0]["state"] == "off"
    assert doc["targets"][0]["why"].startswith("switched off by ")
    code, out, _ = run("account", "show", GRAD)
    assert code == 0 and f"target 1: {HOME}  off: switched off by" in out
    assert "550 5.1.1" in out and "redirection desactivee" in out

    def listed(*flags: str) -> list[str]:
        return [a["address"] for a in run_json(run, "account", "list", *flags)["accounts"]]

    assert listed("--state", "off") == [GRAD]
    assert listed("--state", "pending") == [f"pierre.curie@{DOMAIN}"]
    assert listed("--state", "failing") == []
    assert listed("--state", "deleted", "--with-redirect") == [GRAD]
    lookup = run_json(run, "lookup", GRAD)
    assert lookup["reason"] == "targets_off" and lookup["reply"].startswith("550 5.1.1")
    assert lookup["account"]["targets"][0]["state"] == "off"
    # Back on: it was never confirmed, so it is declared again, with a new notice.
    before = len(notices_queued(state_dir))
    doc = run_json(run, "account", "target", GRAD, HOME, "on")
    assert doc["targets"][0]["state"] == "pending" and doc["notices"] == 1
    assert len(notices_queued(state_dir)) == before + 1
    lookup = run_json(run, "lookup", GRAD)
    assert (lookup["verdict"], lookup["targets"]) == ("accepted", [HOME])
    code, _, err = run("account", "target", GRAD, "nobody@perso.example", "off")
    assert code == 1 and "is not one of its targets" in err
    assert run("account", "target", GRAD, HOME, "maybe")[0] == 2
    history = run_json(run, "account", "history", GRAD)["history"]
    assert [e["action"] for e in history][-2:] == ["off", "on"]


def test_reserved_addresses_cannot_be_accounts(run: Run) -> None:
    for address in (f"confirm+x@{DOMAIN}", f"Refuse+abc@{DOMAIN}"):
        code, _, err = run("account", "add", address)
        assert code == 1 and "reserved" in err


def test_lookup_of_confirmation_addresses(run: Run, state_dir: Path) -> None:
    run("account", "add", GRAD, "--redirect", HOME, "--no-dns-check")
    with sqlite3.connect(state_dir / "queue.sqlite3") as conn:
        (body,) = conn.execute("SELECT body FROM messages").fetchone()
    confirm = body.split(b"Reply-To: <")[1].split(b">")[0].decode()
    doc = run_json(run, "lookup", confirm)
    assert (doc["verdict"], doc["reason"]) == ("consumed", "confirm")
    assert doc["detail"] == f"a message here would confirm {HOME} for {GRAD}"
    forged = confirm.replace("confirm+01", "confirm+02")
    doc = run_json(run, "lookup", forged)
    assert doc["verdict"] == "refused" and doc["reply"].startswith("550 5.1.1")
    assert doc["detail"] in ("bad hash", "unknown target", "malformed")


def test_token_rotate_and_check(run: Run, state_dir: Path) -> None:
    doc = run_json(run, "token", "rotate")
    assert doc["secrets"] == 1 and doc["file"].endswith("token-secrets")
    assert os.stat(state_dir / "token-secrets").st_mode & 0o777 == 0o600
    assert run_json(run, "token", "rotate")["secrets"] == 2
    os.chmod(state_dir / "token-secrets", 0o640)
    code, out, _ = run("check", "--json")
    problems = json.loads(out)["problems"]
    assert code == 1 and any("token-secrets" in p and "chmod 600" in p for p in problems)
