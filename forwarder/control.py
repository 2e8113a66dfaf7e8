"""The status socket: what the running daemon tells `forwarder status`.

The main process listens on a Unix socket in the state directory, `status.sock`. A client
connects and reads one JSON document, then the daemon closes the connection; it never reads
from the client, so there is no request to parse and nothing to inject. The socket is mode
0660 inside the 0750 state directory: the service user, root and the admins in group
`forwarder` may ask. It needs no metrics endpoint, and it speaks for the whole daemon when
acceptor processes share the work: the main process holds their running totals and the
warnings and errors they report (forwarder/workers.py).

A socket left by a crash refuses connections, which `forwarder status` reports as "not
running"; the next daemon removes it (it holds the state directory's lock by then).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forwarder import __version__, log
from forwarder.clock import Clock
from forwarder.metrics import Metrics

__all__ = ["HOUR", "MAX_SOCKET_PATH", "STATUS_SOCKET", "History", "StatusService"]

STATUS_SOCKET = "status.sock"
STATUS_MODE = 0o660
HOUR = 3600.0
HISTORY_STEP = 60.0
# A refresh of the queue counts is one SQLite query; past this the answer uses the counts
# of the last refresh rather than keep the admin waiting.
REFRESH_TIMEOUT = 2.0
# sockaddr_un.sun_path holds 108 bytes, the terminating NUL included (unix(7)).
MAX_SOCKET_PATH = 107

LOG = log.get("forwarder.daemon")

COUNTED = ("accepted", "refused", "delivered", "deferred", "failed")


def counts(summary: Mapping[str, Any]) -> dict[str, float]:
    """The running totals of a Metrics.summary() that "the last hour" is made of."""
    deliveries = summary["deliveries"]
    return {"accepted": summary["accepted"], "refused": summary["refused"],
            "delivered": deliveries["delivered"], "deferred": deliveries["deferred"],
            "failed": deliveries["failed"]}


class History:
    """Running totals sampled once a minute over the last hour, so that "in the last
    hour" is the difference of two samples (the daemon's counters only grow)."""

    def __init__(self, now: float, totals: Mapping[str, float]) -> None:
        self._samples: deque[tuple[float, dict[str, float]]] = deque(
            [(now, dict(totals))], maxlen=int(HOUR / HISTORY_STEP) + 2)

    def record(self, now: float, totals: Mapping[str, float]) -> None:
        if now - self._samples[-1][0] >= HISTORY_STEP:
            self._samples.append((now, dict(totals)))

    def last_hour(self, now: float, totals: Mapping[str, float]) -> tuple[float, dict[str, int]]:
        """(when the window starts, what was counted since). The window is the last hour,
        to a minute, or the time since start for a daemon younger than that."""
        since, past = self._samples[-1]
        for when, sample in self._samples:
            if now - when <= HOUR:
                since, past = when, sample
                break
        return since, {key: max(0, round(value - past.get(key, 0.0)))
                       for key, value in totals.items()}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class StatusService:
    """Answers on the status socket with a document built from the daemon's metrics, its
    one-hour history, the recent warnings and errors, and what `describe` says about the
    process (listening addresses, acceptors, state)."""

    def __init__(
        self, path: Path, metrics: Metrics, clock: Clock,
        describe: Callable[[], dict[str, Any]], refresh: Callable[[], Awaitable[None]],
    ) -> None:
        self.path = path
        self.metrics = metrics
        self.clock = clock
        self.describe = describe
        self.refresh = refresh
        self.started_at = clock.now()
        self.history = History(self.started_at, counts(metrics.summary()))
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen; a path that cannot take a socket is logged, and the daemon runs on
        without a status socket (mail matters more than the console)."""
        self.started_at = self.clock.now()
        self.history = History(self.started_at, counts(self.metrics.summary()))
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            LOG.warning("status_unavailable", path=str(self.path),
                        error="path longer than a Unix socket address can hold")
            return
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()  # left by a daemon that died: we hold the state lock
        try:
            self._server = await asyncio.start_unix_server(self._answer, path=str(self.path))
            os.chmod(self.path, STATUS_MODE)
        except OSError as exc:
            LOG.warning("status_unavailable", path=str(self.path), error=str(exc))
            await self.close()

    def tick(self) -> None:
        """Called every few seconds: keeps the history's one-minute samples."""
        self.history.record(self.clock.now(), counts(self.metrics.summary()))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(Exception):  # the counts of the last refresh will do
                await asyncio.wait_for(self.refresh(), REFRESH_TIMEOUT)
            writer.write(json.dumps(self.document()).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass  # the client went away: nothing to report
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def document(self) -> dict[str, Any]:
        """The status document (docs/admin.md lists its keys)."""
        now = self.clock.now()
        summary = self.metrics.summary()
        since, last_hour = self.history.last_hour(now, counts(summary))
        doc: dict[str, Any] = {
            "running": True, "version": __version__, "pid": os.getpid(),
            "started_at": _iso(self.started_at),
            "uptime_seconds": round(max(0.0, now - self.started_at), 1),
            "last_hour": {"since": _iso(since), "seconds": round(now - since), **last_hour},
            "queue": {"recipients": {state: round(n) for state, n
                                     in sorted(summary["queue_depth"].items())},
                      "oldest_age_seconds": round(summary["queue_oldest_age_seconds"], 1)},
            "smtp_sessions_open": round(summary["smtp_sessions_open"]),
            "resident_memory_bytes": round(summary["resident_memory_bytes"]),
            "errors": [{**entry, "at": _iso(entry["at"]),
                        "process": entry.get("process", "main")}
                       for entry in log.recent_problems()],
        }
        doc.update(self.describe())
        return doc
