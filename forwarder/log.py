"""structlog set-up: one JSON object per line on stdout (journald), or console for humans.

Event names and fields are listed in docs/logging.md. Message bodies are never logged.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class BatchedLines:
    """A structlog logger that writes the lines of one event-loop iteration in one call.

    Under load a message makes about five lines, and logging was a measured share of the
    daemon's CPU (docs/performance.md): one write(2) per loop iteration instead of one per
    line. Lines wait at most until the loop's next iteration, so journald sees them at
    once; outside a running loop they are written immediately.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lines: list[str] = []
        self._scheduled = False

    def msg(self, message: str) -> None:
        self._lines.append(message)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    debug = info = warning = warn = error = critical = exception = fatal = failure = msg

    def flush(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stdout gone (journald restarted, pipe closed): never fail a session


_OUTPUT: BatchedLines | None = None

# The last warnings and errors, for `forwarder status` (forwarder/control.py): what an
# admin at the console wants first, without searching the journal. The main process keeps
# its own and those its acceptor processes report (forwarder/workers.py).
RECENT_PROBLEMS = 20
_PROBLEM_LEVELS = frozenset({"warning", "warn", "error", "exception", "critical", "fatal"})
_FIELD_CHARS = 300
_problems: deque[dict[str, Any]] = deque(maxlen=RECENT_PROBLEMS)


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= _FIELD_CHARS else text[:_FIELD_CHARS] + "..."


def _remember(method: str, event: Mapping[str, Any]) -> None:
    level = "warning" if method in ("warning", "warn") else "error"
    fields = {k: _plain(v) for k, v in event.items()
              if k not in ("event", "level", "timestamp", "exc_info")}
    _problems.append({"at": time.time(), "level": level, "event": str(event.get("event")),
                      "fields": fields})


def recent_problems() -> list[dict[str, Any]]:
    """The last RECENT_PROBLEMS warnings and errors seen here, oldest first."""
    return sorted(_problems, key=lambda entry: entry["at"])


def drain_problems() -> list[dict[str, Any]]:
    """Those, forgotten here (an acceptor hands them to the main process)."""
    entries = list(_problems)
    _problems.clear()
    return entries


def remember_problems(entries: Iterable[Mapping[str, Any]], process: str) -> None:
    """Warnings and errors another process (`process`) logged, as drain_problems gave them."""
    for entry in entries:
        if isinstance(entry, Mapping) and isinstance(entry.get("at"), int | float):
            fields = entry.get("fields")
            _problems.append({"at": float(entry["at"]), "level": str(entry.get("level")),
                              "event": str(entry.get("event")), "process": process,
                              "fields": dict(fields) if isinstance(fields, Mapping) else {}})


def _remember_processor(logger: Any, method: str, event: MutableMapping[str, Any]
                        ) -> MutableMapping[str, Any]:
    if method in _PROBLEM_LEVELS:
        _remember(method, event)
    return event
_encode = json.JSONEncoder(separators=(", ", ": "), default=str).encode


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def utc_timestamp(now: float) -> str:
    """RFC 3339 UTC with microseconds, e.g. 2026-11-28T17:58:09.319553Z. The date and
    time of day are formatted once a second: a message makes several lines."""
    seconds = int(now)
    return f"{_second(seconds)}.{int((now - seconds) * 1_000_000):06d}Z"


def _json_line(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
    """The whole JSON pipeline in one step: level, UTC timestamp, traceback, encoding.
    (structlog's four stock processors cost twice as much, and a message makes five lines.)"""
    if method in _PROBLEM_LEVELS:
        _remember(method, event)
    event["level"] = "error" if method == "exception" else method
    event["timestamp"] = utc_timestamp(time.time())
    if "exc_info" in event:
        event = structlog.processors.format_exc_info(logger, method, event)
    return str(_encode(event))


def flush() -> None:
    """Write what is pending (at shutdown, before the loop ends)."""
    if _OUTPUT is not None:
        _OUTPUT.flush()


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Set the format, level and stream. Loggers are cached on first use (it halves the
    cost of an event): call this once, before logging; later calls change the stream."""
    global _OUTPUT
    flush()
    if _OUTPUT is None:
        _OUTPUT = BatchedLines(stream or sys.stdout)
    else:
        _OUTPUT.stream = stream or sys.stdout
    output = _OUTPUT
    processors: list[Any]
    if fmt == "console":
        processors = [
            _remember_processor,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer(colors=False),
        ]
    else:
        processors = [_json_line]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level.lower(), 20)),
        logger_factory=lambda *args: output,
        cache_logger_on_first_use=True,
    )


def get(name: str) -> Any:
    return structlog.get_logger(name)
