"""The admin CLI through its entry point, against real state directories, a real daemon, a
real SMTP sink and a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from forwarder.cli import build_parser, main
from forwarder.clock import FakeClock
from forwarder.config import HostPort
from forwarder.directory import Directory
from forwarder.returnpath import HASH_LENGTH
from forwarder.srs import Srs
from forwarder.srsstore import load_secrets
from tests.conftest import (
    DOMAIN,
    DaemonFactory,
    Run,
    Sink,
    refused_port,
    run_json,
    scan_due,
    simple_message,
    smtp_send,
    until,
)
from tests.dnsserver import Behaviour, DnsServer

GRAD = f"jean.dupont@{DOMAIN}"
TARGET = "jean.dupont@perso.example"

@pytest.fixture(autouse=True)
def _no_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORWARDER_CONFIG", raising=False)


# --- accounts -------------------------------------------------------------------------


def test_account_lifecycle_and_history(run: Run) -> None:
    assert run("account", "add", GRAD.upper(), "--redirect", TARGET, "--no-dns-check")[0] == 0
    doc = run_json(run, "account", "show", GRAD)
    assert doc["address"] == GRAD and doc["state"] == "active"
    assert [(t["target"], t["state"]) for t in doc["targets"]] == [(TARGET, "pending")]
    assert run("account", "redirect", GRAD, "new@elsewhere.example", "--no-dns-check")[0] == 0
    code, out, _ = run("account", "delete", GRAD)
    assert code == 0 and "forwarded to new@elsewhere.example" in out
    assert run_json(run, "lookup", GRAD)["target"] == "new@elsewhere.example"
    assert run("account", "unredirect", GRAD)[0] == 0
    assert run_json(run, "lookup", GRAD)["reply"].startswith("550 5.1.1")
    history = run_json(run, "account", "history", GRAD)["history"]
    assert [e["action"] for e in history] == ["add", "redirect", "delete", "unredirect"]
    assert history[0]["old"] is None and history[0]["new"] == {"state": "active",
                                                              "targets": [TARGET]}
    assert history[2]["old"]["state"] == "active" and history[2]["new"]["state"] == "deleted"
    assert all(e["actor"] and e["at"].endswith("+00:00") for e in history)


def test_account_list_filters(run: Run) -> None:
    for name, redirect in (("a.a", TARGET), ("b.b", None), ("c.c", TARGET)):
        argv = ["account", "add", f"{name}@{DOMAIN}", "--no-dns-check"]
        run(*argv, *(["--redirect", redirect] if redirect else []))
    run("account", "delete", f"a.a@{DOMAIN}")
    run("account", "delete", f"b.b@{DOMAIN}")

    def listed(*flags: str) -> list[str]:
        return [a["address"] for a in run_json(run, "account", "list", *flags)["accounts"]]

    assert listed() == [f"a.a@{DOMAIN}", f"b.b@{DOMAIN}", f"c.c@{DOMAIN}"]
    assert listed("--state", "active") == [f"c.c@{DOMAIN}"]
    assert listed("--state", "deleted", "--with-redirect") == [f"a.a@{DOMAIN}"]
    assert listed("--state", "deleted", "--without-redirect") == [f"b.b@{DOMAIN}"]
    code, out, _ = run("account", "list")
    assert code == 0 and out.strip().endswith("-- 3 account(s)")
    assert run("account", "list", "--with-redirect", "--without-redirect")[0] == 2


def test_purge_erases_row_and_history(run: Run, state_dir: Path) -> None:
    run("account", "add", GRAD, "--redirect", TARGET, "--no-dns-check")
    run("account", "delete", GRAD)
    code, _, err = run("account", "purge", GRAD)
    assert code == 1 and "--yes" in err and err.count("\n") == 1
    assert run("account", "purge", GRAD, "--yes")[0] == 0
    assert run_json(run, "lookup", GRAD)["reply"] == f"550 5.1.1 <{GRAD}>: user unknown"
    assert run("account", "history", GRAD)[0] == 1
    conn = sqlite3.connect(state_dir / "directory.sqlite3")
    dump = "\n".join(conn.iterdump())
    assert "jean.dupont" not in dump  # neither the address nor the redirect is left
    actions = [r[0] for r in conn.execute("SELECT action FROM audit ORDER BY id")]
    assert actions == ["add", "delete", "purge"]


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("not-an-address", "@-sign"),
        (f"loop@{DOMAIN}", "inside our own domain"),
        (f"loop@mail.{DOMAIN}", "inside our own domain"),
        ("jd@perso.example\r\nRCPT TO:<victim@x.example>", "control characters"),
        ('"jd smith"@perso.example', "quoted"),
        ("@relay.example:jd@perso.example", "source route"),
        ("jd%other.example@perso.example", "not allowed"),
        ("a" * 65 + "@perso.example", "64"),
    ],
)
def test_bad_redirect_targets_are_refused(run: Run, target: str, why: str) -> None:
    run("account", "add", GRAD)
    code, out, err = run("account", "redirect", GRAD, target, "--no-dns-check")
    assert code == 1 and out == ""
    assert why in err and err.startswith("forwarder: ") and err.count("\n") == 1
    code, _, err = run("account", "add", f"other@{DOMAIN}", "--redirect", target,
                       "--no-dns-check")
    assert code == 1 and why in err
    assert run_json(run, "account", "show", GRAD)["targets"] == []


def test_refusals_and_usage_errors(run: Run) -> None:
    code, _, err = run("account", "redirect", f"nobody@{DOMAIN}", TARGET, "--no-dns-check")
    assert code == 1 and "no such account" in err
    assert run("account", "show", "someone@other.example")[0] == 1
    assert run("account", "add", f"postmaster@{DOMAIN}")[0] == 1
    run("account", "add", GRAD)
    code, _, err = run("account", "add", GRAD)
    assert code == 1 and "already exists" in err
    run("account", "delete", GRAD)
    assert run("account", "delete", GRAD)[0] == 1
    assert run("account", "frobnicate")[0] == 2
    assert run("account", "add")[0] == 2


def test_every_command_has_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    commands: list[list[str]] = []

    def walk(p: Any, prefix: list[str]) -> None:
        for action in p._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, child in action.choices.items():
                    commands.append([*prefix, name])
                    walk(child, [*prefix, name])

    walk(parser, [])
    assert ["queue", "hold"] in commands and ["srs", "reverse"] in commands
    for argv in commands:
        assert main([*argv, "--help"]) == 0
        out = capsys.readouterr().out
        assert "example:" in out and "forwarder " + argv[0] in out, argv


# --- DNS check of targets, against the loopback DNS server ----------------------------


def _zone(server: DnsServer) -> None:
    server.set_records("perso.example.", "MX", [(10, "mx.perso.example.")])
    server.set_records("mx.perso.example.", "A", ["127.0.0.1"])
    server.set_records("aonly.example.", "A", ["127.0.0.1"])
    server.set_records("nullmx.example.", "MX", [(0, ".")])
    server.set_records("nomail.example.", "TXT", ['"v=spf1 -all"'])
    server.set_behaviour("slow.example.", Behaviour.TIMEOUT)


async def test_redirect_dns_check(dns_server: DnsServer, run: Run) -> None:
    _zone(dns_server)
    dns = ["--dns-server", f"127.0.0.1:{dns_server.port}", "--dns-timeout", "0.5"]
    await asyncio.to_thread(run, "account", "add", GRAD)

    async def redirect(target: str) -> tuple[int, str, str]:
        return await asyncio.to_thread(run, "account", "redirect", GRAD, target, *dns)

    assert (await redirect(TARGET))[0] == 0
    assert (await redirect("jd@aonly.example"))[0] == 0  # implicit MX (RFC 5321 5.1)
    for domain in ("nxdomain.example", "nullmx.example", "nomail.example"):
        code, _, err = await redirect(f"jd@{domain}")
        assert code == 1 and f"domain {domain} cannot receive mail" in err
    code, _, err = await redirect("jd@slow.example")
    assert code == 1 and "timed out" in err and "not checked" in err
    assert "cannot receive mail" not in err
    assert (await redirect("jd@slow.example"))[0] == 1
    show = await asyncio.to_thread(run, "account", "show", GRAD, "--json")
    assert [t["target"] for t in json.loads(show[1])["targets"]] == ["jd@aonly.example"]
    # --no-dns-check skips the lookup altogether.
    before = len(dns_server.queries)
    code, _, _ = await asyncio.to_thread(run, "account", "redirect", GRAD, "jd@slow.example",
                                         *dns, "--no-dns-check")
    assert code == 0 and len(dns_server.queries) == before


# --- lookup ---------------------------------------------------------------------------


def test_lookup_verdicts(run: Run, state_dir: Path) -> None:
    run("account", "add", GRAD, "--redirect", TARGET, "--no-dns-check")
    doc = run_json(run, "lookup", GRAD)
    assert doc["verdict"] == "deferred" and doc["reason"] == "mailbox_unset"
    assert doc["reply"].startswith("451 4.3.0")
    doc = run_json(run, "lookup", GRAD, "--mailbox-host", "mail.school.example:25")
    assert doc["route"] == "mailbox" and doc["next_hop"] == "mailbox host mail.school.example:25"
    doc = run_json(run, "lookup", "someone@gmail.example")
    assert (doc["verdict"], doc["reply"]) == (
        "refused", "554 5.7.1 <someone@gmail.example>: relay access denied")
    doc = run_json(run, "lookup", f"nobody@{DOMAIN}")
    assert doc["reason"] == "unknown" and doc["account"] is None
    assert run_json(run, "lookup", f"x%y@{DOMAIN}")["reply"].startswith("553 5.1.3")
    run("account", "delete", GRAD)
    code, out, _ = run("lookup", GRAD, "--smarthost", "relay.example:2525")
    assert code == 0
    assert "route: redirect -> jean.dupont@perso.example via smarthost relay.example:2525" in out


def test_lookup_and_srs_reverse_of_srs_addresses(run: Run, state_dir: Path) -> None:
    assert run("srs", "rotate")[0] == 0  # creates the secrets file
    srs = Srs(load_secrets(state_dir / "srs-secrets"), DOMAIN, time.time,
              hash_length=HASH_LENGTH)
    bounce_to = srs.forward("alice@sender.example")
    doc = run_json(run, "lookup", bounce_to)
    assert (doc["verdict"], doc["route"], doc["target"]) == (
        "accepted", "srs_return", "alice@sender.example")
    assert run("srs", "reverse", bounce_to)[1].strip() == "alice@sender.example"
    # After a rotation the old secret still verifies (rotation keeps it).
    run("srs", "rotate")
    assert len(load_secrets(state_dir / "srs-secrets")) == 2
    assert run_json(run, "srs", "reverse", bounce_to)["original"] == "alice@sender.example"
    forged = bounce_to.replace("SRS0=", "SRS0=x", 1)
    code, out, err = run("srs", "reverse", forged)
    assert code == 1 and "invalid SRS address" in err
    doc = run_json(run, "lookup", forged)
    assert doc["verdict"] == "refused" and doc["reply"].startswith("550 5.1.1")
    code, out, _ = run("srs", "reverse", forged, "--json")
    assert code == 1 and json.loads(out)["valid"] is False


# --- check ----------------------------------------------------------------------------


def test_check_reports_every_problem(run: Run, state_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text('colour = "blue"\nbusy_timeout = -1\nlisten = "nowhere:99999"\n'
                      '[delivery]\nfirst_retry = "soon"\n')
    run("account", "add", GRAD)  # an active account, and no mailbox_host
    run("srs", "rotate")
    os.chmod(state_dir / "srs-secrets", 0o644)
    code, out, err = run("check", "--config", str(config), "--json")
    assert code == 1
    problems = json.loads(out)["problems"]
    text = "\n".join(problems)
    for expected in ("unknown key 'colour'", "busy_timeout", "listen", "first_retry",
                     "mailbox_host: not set, but 1 active", "chmod 600"):
        assert expected in text, expected
    assert err.count("forwarder: problem:") == len(problems)
    # Other commands refuse to run on a bad file.
    assert run("account", "list", "--config", str(config))[0] == 1


def test_check_reports_the_inbound_checks_settings(run: Run, tmp_path: Path) -> None:
    config = tmp_path / "checks.toml"
    config.write_text('xforward_hosts = ["10.0.0.10", "gateway"]\n'
                      '[checks]\nenabled = "yes"\ndmarc_reject = "bounce"\nthreads = 0\n'
                      'authserv_id = "a; dkim=pass"\ndeadline = 0\n'
                      '[rspamd]\nurl = "ftp://rspamd"\nfail_open = 1\n'
                      '[rate_limits]\nexempt = ["10.0.0.0/8", "gateway"]\nburst = 3\n')
    code, out, _ = run("check", "--config", str(config), "--json")
    assert code == 1
    text = "\n".join(json.loads(out)["problems"])
    for expected in ("[checks] enabled: must be true or false",
                     "[checks] dmarc_reject: must be one of reject, mark, off",
                     "[checks] threads: must be at least 1", "[checks] authserv_id",
                     "[checks] deadline: must be a number of seconds > 0",
                     "[rspamd] url: must be an http:// or https:// URL",
                     "[rspamd] fail_open: must be true or false",
                     "[rate_limits] exempt: 'gateway' is not an address or network",
                     "xforward_hosts: 'gateway' is not an address or network",
                     "[rate_limits] unknown key 'burst'"):
        assert expected in text, expected
    good = tmp_path / "good.toml"
    good.write_text('xforward_hosts = ["10.0.0.10/32", "2001:db8::10"]\n'
                    '[checks]\nenabled = true\ndmarc_reject = "mark"\n'
                    '[rspamd]\nurl = "http://10.0.0.30:11333"\n'
                    '[rate_limits]\nexempt = ["10.0.0.25/32"]\nclient_per_minute = 0\n')
    run("srs", "rotate")
    assert run("check", "--config", str(good))[0] == 0


def test_check_loads_the_starttls_certificate(run: Run, tmp_path: Path) -> None:
    config = tmp_path / "tls.toml"
    config.write_text(f'tls_cert = "{tmp_path}/none.pem"\ntls_key = "{tmp_path}/none.key"\n')
    run("srs", "rotate")
    code, _, err = run("check", "--config", str(config))
    assert code == 1 and "tls_cert/tls_key: [Errno 2]" in err


def test_check_ok_and_bad_state_dir(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "ok.toml"
    config.write_text('mailbox_host = "127.0.0.1:25"\npostmaster = "it@school.example"\n'
                      'dns_servers = ["127.0.0.1:53"]\n')
    run("account", "add", GRAD)
    run("srs", "rotate")
    code, out, err = run("check", "--config", str(config))
    assert (code, err) == (0, "") and "OK" in out
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    for bad, why in ((tmp_path / "missing", "does not exist"), (not_a_dir, "not a directory")):
        assert main(["check", "--config", str(config), "--state-dir", str(bad)]) == 1
        assert why in capsys.readouterr().err


# --- queue tools while the daemon runs ------------------------------------------------


async def test_queue_tools_steer_the_running_daemon(
    start_daemon: DaemonFactory, directory: Directory, state_dir: Path, run: Run,
) -> None:
    directory.add(GRAD, [TARGET])
    directory.delete(GRAD)
    port = await refused_port()  # connection refused: the first attempt defers
    d = await start_daemon(smarthost=HostPort("127.0.0.1", port))
    await smtp_send(d.port, "noreply@jobteaser.com", [GRAD], simple_message("reset"))

    def listing() -> Any:
        _code, out, _ = run("queue", "list", "--json")
        return json.loads(out)

    await until(lambda: [r["attempts"] for m in listing()["messages"]
                          for r in m["recipients"]] == [1])
    (message,) = listing()["messages"]
    (rcpt,) = message["recipients"]
    assert rcpt["state"] == "queued" and rcpt["last_error"] and rcpt["next_attempt"]
    assert message["sender"] == "noreply@jobteaser.com" and message["held"] is False
    qid = message["id"]
    _code, out, _ = run("queue", "list")
    assert f"{qid} " in out and "-- 1 Kbytes in 1 request(s), 1 recipient(s), 0 held." in out
    shown = run_json(run, "queue", "show", qid.lower())
    assert ["Subject", "reset"] in shown["headers"] and shown["recipients"][0]["attempts"] == 1
    up = Sink()
    await up.start(port)
    try:
        assert run("queue", "hold", qid)[0] == 0
        assert run_json(run, "queue", "retry", qid)["retried"] == 1
        assert await scan_due(d) == 0  # due, but held: not leased
        assert not d.dispatcher.in_flight  # so nothing can be on its way to `up`
        assert up.messages == [] and listing()["held"] == 1
        assert run("queue", "release", qid)[0] == 0
        assert run("queue", "retry")[0] == 0
        await scan_due(d)
        (got,) = await up.wait_for(1)
        assert got.rcpt_tos == [TARGET]
        await until(lambda: listing()["count"] == 0)
    finally:
        await up.stop()


async def test_queue_delete_and_unknown_ids(
    start_daemon: DaemonFactory, directory: Directory, run: Run, clock: FakeClock,
) -> None:
    directory.add(GRAD, [TARGET])
    directory.delete(GRAD)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", await refused_port()))
    await smtp_send(d.port, "noreply@jobteaser.com", [GRAD], simple_message())
    await until(lambda: run_json(run, "queue", "list")["recipients"] == 1)
    qid = run_json(run, "queue", "list")["messages"][0]["id"]
    for argv in (["show", "NOSUCHID"], ["hold", "NOSUCHID"], ["retry", "NOSUCHID"],
                 ["delete", "NOSUCHID", "--yes"]):
        code, _, err = run("queue", *argv)
        assert code == 1 and "no such message" in err, argv
    code, _, err = run("queue", "delete", qid)
    assert code == 1 and "--yes" in err
    await until(lambda: run_json(run, "queue", "list")["messages"][0]["recipients"][0][
        "in_delivery"] is False)
    assert run_json(run, "queue", "delete", qid, "--yes")["deleted"] is True
    assert run("queue", "list")[1].strip() == "Mail queue is empty"
    clock.advance(4000)
    assert await scan_due(d) == 0
