"""`forwarder status`: one screen on the running daemon, read from its status socket.

The daemon answers on `status.sock` in its state directory (forwarder/control.py) with one
JSON document; `--json` prints it as it came (plus nothing), the text form is built here.
The screen is a list of sections, each drawn by one function from one key of the document,
so a section for a new part of the daemon is one more function in SECTIONS.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forwarder.cli_common import CliError, add_command, duration, emit, one_line
from forwarder.config import Settings
from forwarder.control import HOUR, MAX_SOCKET_PATH, STATUS_SOCKET

ANSWER_TIMEOUT = 5.0
MAX_ANSWER = 1 << 20
SHOWN_ERRORS = 8
WIDTH = 200


def read_status(path: Path, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
    """The daemon's status document, or CliError saying why there is none."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise CliError(f"{path}: too long for a Unix socket, so the daemon has no status "
                       "socket there either (a shorter state directory path fixes both)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if len(data) > MAX_ANSWER:
                raise CliError(f"{path}: answer too long")
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise CliError(f"the daemon is not running (nothing answers on {path})",
                       {"running": False, "socket": str(path)}) from exc
    except PermissionError as exc:
        raise CliError(f"{path}: permission denied (run as root, as the service user or "
                       "as a member of its group)") from exc
    except TimeoutError as exc:
        raise CliError(f"the daemon did not answer on {path} within {timeout:g} s "
                       "(its event loop may be stuck)",
                       {"running": None, "socket": str(path)}) from exc
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror or exc}") from exc
    finally:
        sock.close()
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise CliError(f"{path}: not a status document ({exc})") from exc
    if not isinstance(doc, dict):
        raise CliError(f"{path}: not a status document")
    return doc


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    doc = read_status(settings.state_dir / STATUS_SOCKET, args.timeout)
    emit(args, doc, render(doc))
    return 0


# --- the screen -------------------------------------------------------------------------


def _daemon(doc: dict[str, Any]) -> list[str]:
    acceptors = doc.get("acceptors") or []
    processes = f", {len(acceptors)} acceptor process(es)" if acceptors else ""
    return [f"forwarder {doc.get('version')}: {doc.get('state', 'running')} "
            f"(pid {doc.get('pid')}{processes}), up {duration(doc.get('uptime_seconds', 0))} "
            f"since {doc.get('started_at')}"]


def _listening(doc: dict[str, Any]) -> list[str]:
    listening = doc.get("listening") or {}
    metrics = listening.get("metrics") or "off"
    return [f"listening: SMTP {', '.join(listening.get('smtp') or [])}; metrics {metrics}"]


def _last_hour(doc: dict[str, Any]) -> list[str]:
    hour = doc.get("last_hour") or {}
    span = hour.get("seconds", 0)
    when = "last hour" if span >= HOUR - 60 else f"since start ({duration(span)})"
    return [f"{when}: {hour.get('accepted', 0)} accepted, {hour.get('refused', 0)} refused "
            f"after DATA; deliveries {hour.get('delivered', 0)} delivered, "
            f"{hour.get('deferred', 0)} deferred, {hour.get('failed', 0)} failed"]


def _queue(doc: dict[str, Any]) -> list[str]:
    queue = doc.get("queue") or {}
    states: dict[str, int] = queue.get("recipients") or {}
    total = sum(n for state, n in states.items() if state != "in_flight")
    parts = ", ".join(f"{n} {state.replace('_', ' ')}" for state, n in states.items())
    oldest = queue.get("oldest_age_seconds") or 0
    age = f"; oldest message {duration(oldest)}" if oldest else ""
    return [f"queue: {total} recipient(s) ({parts or 'empty'}){age}; "
            f"{doc.get('smtp_sessions_open', 0)} SMTP session(s) open; "
            f"memory {doc.get('resident_memory_bytes', 0) / 1048576:.0f} MiB"]


def _errors(doc: dict[str, Any]) -> list[str]:
    errors = doc.get("errors") or []
    if not errors:
        return ["no warnings or errors since start"]
    lines = [f"last warnings and errors ({len(errors)}, newest last):"]
    for entry in errors[-SHOWN_ERRORS:]:
        fields = " ".join(f"{k}={v}" for k, v in (entry.get("fields") or {}).items())
        where = "" if entry.get("process", "main") == "main" else f" [{entry['process']}]"
        lines.append(one_line(f"  {entry.get('at')} {entry.get('level')} "
                              f"{entry.get('event')}{where} {fields}".rstrip())[:WIDTH])
    return lines


SECTIONS: tuple[Callable[[dict[str, Any]], list[str]], ...] = (
    _daemon, _listening, _last_hour, _queue, _errors)


def render(doc: dict[str, Any]) -> str:
    return "\n".join(line for section in SECTIONS for line in section(doc))


def register(sub: Any) -> None:
    p = add_command(sub, "status", cmd_status,
                    "what the running daemon is doing: uptime, traffic in the last hour, "
                    "queue, recent errors (exit 1 if it is not running)",
                    "sudo -u forwarder forwarder status", json_flag=True)
    p.add_argument("--timeout", type=float, default=ANSWER_TIMEOUT, metavar="SECONDS",
                   help=f"how long to wait for the daemon's answer (default {ANSWER_TIMEOUT:g})")
