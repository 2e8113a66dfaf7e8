"""structlog set-up: one JSON object per line on stdout (journald), or console for humans.

Event names and fields are listed in docs/logging.md. Message bodies are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class BatchedLines:
    """A structlog logger that writes the lines of one event-loop iteration in one call.

    Under load a message makes about five lines; one write(2) each was 6 % of the daemon's
    CPU (docs/performance.md). Lines wait at most until the loop's next iteration, so
    journald sees them at once; outside a running loop they are written immediately.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
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
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stdout gone (journald restarted, pipe closed): never fail a session


_OUTPUT: BatchedLines | None = None


def flush() -> None:
    """Write what is pending (at shutdown, before the loop ends)."""
    if _OUTPUT is not None:
        _OUTPUT.flush()


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    global _OUTPUT
    flush()
    output = _OUTPUT = BatchedLines(stream or sys.stdout)
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level.lower(), 20)),
        logger_factory=lambda *args: output,
        cache_logger_on_first_use=False,
    )
    # aiosmtpd logs every command line at INFO through the stdlib logger "mail.log":
    # that would put addresses and volume we do not want in the journal.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def get(name: str) -> Any:
    return structlog.get_logger(name)
