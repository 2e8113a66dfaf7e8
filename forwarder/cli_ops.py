"""`forwarder check`, `srs rotate|reverse`, `token rotate` and `serve`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sqlite3
import ssl
import sys
import tomllib
from pathlib import Path
from typing import Any

from forwarder.cli_common import (
    CliError,
    add_command,
    add_group,
    emit,
    one_line,
    open_directory,
)
from forwarder.clock import SystemClock
from forwarder.clustercheck import cluster_problems
from forwarder.config import ConfigError, Settings
from forwarder.directory import (
    SCHEMA_VERSION,
    count_active,
    token_secrets_path,
    token_secrets_problems,
)
from forwarder.directory.pgschema import open_directory_db
from forwarder.directory.pgstores import PgKeys, PgSecrets
from forwarder.dns import CachingResolver
from forwarder.migrations import inspect_database
from forwarder.postfixmaps import RECIPIENTS_FILE, TRANSPORT_FILE, postfix_maps
from forwarder.queue import QUEUE_SCHEMA_VERSION
from forwarder.returnpath import (
    KEYS_FILE,
    MAX_AGE_DAYS,
    load_srs,
    secrets_path,
)
from forwarder.srs import KeyRef, SrsError, SrsReason
from forwarder.srsstore import (
    SecretsFile,
    SqliteKeys,
    ensure_secrets,
    load_secrets,
    rotate_secrets,
    secrets_file_problems,
)

# --- SRS ------------------------------------------------------------------------------


def srs_reverse(settings: Settings, address: str) -> str:
    """The original sender behind one of our SRS addresses, as the daemon would find it;
    raises SrsError. Read-only: a missing secrets file or key store means "not ours"."""
    if settings.directory_url:
        return _pg_srs_reverse(settings, address)
    path = secrets_path(settings.state_dir)
    if not path.exists():
        raise SrsError(SrsReason.BAD_HASH)  # the daemon would start with a fresh secret
    srs = load_srs(SecretsFile(path), settings.effective_srs_domain, SystemClock(),
                   record=False)
    result = srs.reverse(address)
    if not isinstance(result, KeyRef):
        return result
    keys = settings.state_dir / KEYS_FILE
    found = None
    if keys.exists():
        store = SqliteKeys(keys)
        try:
            found = store.get(result.key)
        finally:
            store.close()
    if found is None:
        raise SrsError(SrsReason.UNKNOWN_KEY)
    return found


def _pg_srs_reverse(settings: Settings, address: str) -> str:
    """As any node of several would reverse it: secrets and keys from PostgreSQL."""
    conn = open_directory_db(settings.directory_url, settings.directory_password)
    try:
        srs = load_srs(PgSecrets(conn, "srs"), settings.effective_srs_domain, SystemClock(),
                       record=False)
        result = srs.reverse(address)
        if not isinstance(result, KeyRef):
            return result
        found = PgKeys(conn).get(result.key)
    except ValueError as exc:  # no secret yet: no address of ours can verify
        raise SrsError(SrsReason.BAD_HASH) from exc
    finally:
        conn.close()
    if found is None:
        raise SrsError(SrsReason.UNKNOWN_KEY)
    return found


def cmd_srs_reverse(args: argparse.Namespace, settings: Settings) -> int:
    try:
        original = srs_reverse(settings, args.address)
    except SrsError as exc:
        raise CliError(f"{one_line(args.address)}: invalid SRS address: {exc.reason.value}",
                       {"address": args.address, "valid": False, "reason": exc.reason.value,
                        "original": None}) from exc
    emit(args, {"address": args.address, "valid": True, "reason": None, "original": original},
         original)
    return 0


def cmd_srs_rotate(args: argparse.Namespace, settings: Settings) -> int:
    if settings.directory_url:
        conn = open_directory_db(settings.directory_url, settings.directory_password)
        try:
            count = PgSecrets(conn, "srs").rotate()
        finally:
            conn.close()
        emit(args, {"file": "postgresql", "action": "rotated", "secrets": count},
             f"PostgreSQL directory: SRS secrets rotated; {count} secret(s), the first one "
             "signs. Every node copies them and signs with the new one within a second.")
        return 0
    path = secrets_path(settings.state_dir)
    settings.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    if ensure_secrets(path):
        action = "created"
        # New secrets sign only long hashes: no short-hash leniency for this installation.
        SecretsFile(path).short_hashes_until(True, 0)
    else:
        rotate_secrets(path)
        action = "rotated"
    count = len(load_secrets(path))
    emit(args, {"file": str(path), "action": action, "secrets": count},
         f"{path}: {action}; {count} secret(s), the first one signs. Run "
         "'systemctl reload forwarder' so the daemon signs with it; keep the old ones "
         f"at least {MAX_AGE_DAYS + 1} days so bounces of mail already forwarded verify.")
    return 0


def cmd_token_rotate(args: argparse.Namespace, settings: Settings) -> int:
    directory = open_directory(settings)
    count = directory.rotate_token_secrets()
    if settings.directory_url:
        emit(args, {"file": "postgresql", "secrets": count},
             f"PostgreSQL directory: {count} token secret(s), the first one signs. Every "
             "node copies them and checks with them within a second.")
        return 0
    path = token_secrets_path(settings.state_dir)
    emit(args, {"file": str(path), "secrets": count},
         f"{path}: {count} secret(s), the first one signs. Run 'systemctl reload "
         "forwarder' so the daemon checks with it; keep the old ones at least "
         f"{int(settings.targets.token_days) + 1} days so notices already sent verify.")
    return 0


# --- check ----------------------------------------------------------------------------


def fallback_settings(args: argparse.Namespace) -> Settings:
    """Settings to go on checking with when the file has problems: defaults, the file's
    state_dir if it can be read, then the flags."""
    settings = Settings()
    with_file = args.config or os.environ.get("FORWARDER_CONFIG")
    try:
        with open(with_file or os.devnull, "rb") as fh:
            state_dir = tomllib.load(fh).get("state_dir") if with_file else None
        if isinstance(state_dir, str):
            settings = dataclasses.replace(settings, state_dir=Path(state_dir))
    except (OSError, tomllib.TOMLDecodeError):
        pass
    if args.state_dir:
        settings = dataclasses.replace(settings, state_dir=Path(args.state_dir))
    return settings


def _state_dir_problems(state_dir: Path) -> list[str]:
    if not state_dir.exists():
        return [f"state_dir {state_dir}: does not exist"]
    if not state_dir.is_dir():
        return [f"state_dir {state_dir}: not a directory"]
    if not os.access(state_dir, os.R_OK | os.W_OK | os.X_OK):
        return [f"state_dir {state_dir}: not readable and writable by this user "
                f"(uid {os.getuid()})"]
    return []


def _storage_problems(settings: Settings, notes: list[str]) -> list[str]:
    problems = _state_dir_problems(settings.state_dir)
    problems += inspect_database(settings.directory_path, SCHEMA_VERSION)
    problems += inspect_database(settings.queue_path, QUEUE_SCHEMA_VERSION)
    problems += token_secrets_problems(token_secrets_path(settings.state_dir))
    secrets = secrets_path(settings.state_dir)
    if settings.directory_url:  # the secrets are in PostgreSQL (forwarder/clustercheck.py)
        pass
    elif secrets.exists():
        problems += secrets_file_problems(secrets)
    elif not problems:  # a fresh install: the daemon (or `check --init`) creates it
        notes.append(f"{secrets}: not created yet; the daemon creates it at its first "
                     "start (or run 'forwarder check --init')")
    if settings.mailbox_host is None:
        try:
            active = count_active(settings.directory_path, settings.busy_timeout)
        except sqlite3.Error:
            active = 0  # already reported by inspect_database
        if active:
            problems.append(f"mailbox_host: not set, but {active} active account(s) exist: "
                            "their mail is deferred (451) until it is")
    if settings.smarthost is None and not settings.dns_servers:
        try:
            CachingResolver(use_system_config=True)
        except Exception as exc:
            problems.append(f"no smarthost and no DNS resolver ({type(exc).__name__}): "
                            "forwarded mail cannot be routed; set dns_servers or smarthost")
    return problems


def _tls_problems(settings: Settings) -> list[str]:
    """The STARTTLS certificate and key load together, as the daemon will load them."""
    if settings.tls_cert is None and settings.tls_key is None:
        return []
    from forwarder.connections import load_tls_context

    try:
        load_tls_context(settings.tls_cert, settings.tls_key)
    except (OSError, ValueError, ssl.SSLError) as exc:
        return [f"tls_cert/tls_key: {exc}"]
    return []


def _init(settings: Settings) -> list[str]:
    """`check --init`: what the first start would create (the state directory, the SRS
    secrets), so a fresh install checks clean before it ever ran."""
    done = []
    if not settings.state_dir.exists():
        settings.state_dir.mkdir(mode=0o750, parents=True)
        done.append(f"created {settings.state_dir}")
    secrets = secrets_path(settings.state_dir)
    if settings.state_dir.is_dir() and ensure_secrets(secrets):
        done.append(f"created {secrets}")
    return done


def _postfix_lines(settings: Settings) -> list[str]:
    """The Postfix gateway's tables for our domains (docs/admin.md section 3)."""
    listen = settings.listen
    host = listen.host if listen.host not in ("0.0.0.0", "::", "") else settings.hostname
    maps = postfix_maps(settings.domains, settings.effective_srs_domain,
                        f"{host}:{listen.port}")
    return ["# main.cf", *maps.main_cf, f"# /etc/postfix/{TRANSPORT_FILE}", *maps.transport,
            f"# /etc/postfix/{RECIPIENTS_FILE}", *maps.recipients]


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    notes = _init(settings) if getattr(args, "init", False) else []
    problems = [f"config: {p}" for p in getattr(args, "config_problems", [])]
    problems += _storage_problems(settings, notes)
    problems += _tls_problems(settings)
    staleness = None
    if settings.directory_url:
        found, staleness = cluster_problems(settings, notes)
        problems += found
    warnings = []
    if settings.postmaster is None:
        warnings.append("postmaster: not set; mail to postmaster@ and abuse@ our domains is "
                        "deferred (RFC 5321 4.5.1 requires postmaster)")
    for problem in problems:
        print(f"forwarder: problem: {problem}", file=sys.stderr)
    for warning in warnings:
        print(f"forwarder: warning: {warning}", file=sys.stderr)
    for note in notes:
        print(f"forwarder: note: {note}", file=sys.stderr)
    text = (f"{len(problems)} problem(s), {len(warnings)} warning(s)" if problems or warnings
            else "configuration and storage OK")
    postfix = _postfix_lines(settings)
    text += ("\n\nThe school's Postfix gateway routes these addresses here too (docs/admin.md "
             "section 3):\n" + "\n".join(postfix))
    emit(args, {"ok": not problems, "problems": problems, "warnings": warnings,
                "notes": notes, "postfix_maps": postfix,
                "directory_staleness_seconds": staleness,
                "config_file": None if settings.config_file is None else
                str(settings.config_file), "state_dir": str(settings.state_dir)}, text)
    return 1 if problems else 0


# --- serve ----------------------------------------------------------------------------


def _acceptor_argv(args: argparse.Namespace, settings: Settings) -> list[str]:
    """The acceptors re-read the same file with the same flags (and re-read them on
    SIGHUP), so they always agree with the main process."""
    argv = ["--state-dir", str(settings.state_dir)]
    if args.config:
        argv += ["--config", args.config]
    for flag in ("listen", "smarthost", "mailbox_host", "log_format", "log_level", "acceptors"):
        value = getattr(args, flag, None)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    return argv


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from forwarder import daemon
    from forwarder.cli_common import settings_for
    from forwarder.workers import Inherited

    inherited = None
    if args.control_fd is not None:
        inherited = Inherited(args.control_fd, args.counts_fd, args.slot)
    # SIGHUP re-reads the same file with the same flags on top (flags keep precedence).
    return daemon.run(settings, reload_settings=lambda: settings_for(args),
                      acceptor_argv=_acceptor_argv(args, settings), inherited=inherited)


def register(sub: Any) -> None:
    p = add_command(sub, "serve", cmd_serve, "run the daemon",
                    "forwarder serve --listen 0.0.0.0:25 --smarthost relay.example:25")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to listen on")
    p.add_argument("--smarthost", metavar="HOST:PORT", help="relay all forwarded mail here")
    p.add_argument("--mailbox-host", metavar="HOST:PORT", help="where active accounts' mail goes")
    p.add_argument("--log-format", choices=["json", "console"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--acceptors", type=int, metavar="N",
                   help="extra accepting processes (default: one per CPU beyond the first)")
    # Set by the main process when it starts an acceptor (forwarder/workers.py).
    p.add_argument("--control-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--counts-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--slot", type=int, help=argparse.SUPPRESS)
    p = add_command(sub, "check", cmd_check,
                    "validate the configuration and the storage; report every problem; "
                    "print the Postfix gateway's tables",
                    "forwarder check --config /etc/forwarder/forwarder.toml", json_flag=True)
    p.add_argument("--init", action="store_true",
                   help="first create what the daemon would at its first start "
                        "(state directory, SRS secrets)")
    p.set_defaults(collect_config_problems=True)
    srs = add_group(sub, "srs", "SRS secrets and addresses",
                    "forwarder srs reverse SRS0=HHHH=TT=example.org=jane@sigma-clermont.fr")
    add_command(srs, "rotate", cmd_srs_rotate,
                "add a new signing secret, keeping the old ones for verification",
                "forwarder srs rotate && systemctl reload forwarder", json_flag=True)
    p = add_command(srs, "reverse", cmd_srs_reverse,
                    "the original sender of an SRS address, or why it is invalid",
                    "forwarder srs reverse SRS0=HHHH=TT=example.org=jane@sigma-clermont.fr",
                    json_flag=True)
    p.add_argument("address")
    token = add_group(sub, "token", "the secrets of the notices' confirm+ and refuse+ addresses",
                      "forwarder token rotate && systemctl reload forwarder")
    add_command(token, "rotate", cmd_token_rotate,
                "add a new signing secret, keeping the old ones for verification",
                "forwarder token rotate && systemctl reload forwarder", json_flag=True)


def config_error_settings(args: argparse.Namespace, exc: ConfigError) -> Settings | None:
    """For `check`: remember the problems and go on with fallback settings."""
    if not getattr(args, "collect_config_problems", False):
        return None
    args.config_problems = exc.problems
    return fallback_settings(args)
