"""sd_notify(3) and the service watchdog, in a few lines of our own (no libsystemd binding).

The protocol is one datagram of newline-separated `KEY=VALUE` fields sent to the AF_UNIX socket
named by $NOTIFY_SOCKET. Without that variable (not under systemd, or in tests) every call is a
no-op, as in gunicorn's `systemd.py`. A failed send never raises: losing a status line must
never take the mail flow down with it. The unit (systemd/forwarder.service) uses
`Type=notify`, `NotifyAccess=main` and `WatchdogSec=`, so only the main process may notify.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

__all__ = ["Notifier", "watchdog_interval", "watchdog_loop"]


def _socket_address(raw: str | None) -> str | None:
    """The address to sendto(), or None when notification is off or the name is unusable."""
    if not raw:
        return None
    if raw.startswith("@"):
        # Linux abstract namespace: systemd writes a leading NUL byte as '@'.
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # sd_notify() rejects relative paths too; anything else (e.g. vsock:) we do not speak.
    return None


def _one_line(text: str) -> str:
    # A newline would end the field and let status text inject another KEY=VALUE assignment.
    return text.replace("\r", " ").replace("\n", " ")


class Notifier:
    """Sends state changes to the service manager; every method returns True if sent."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """Whether a notification socket was given (i.e. we run under systemd Type=notify)."""
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send `KEY=VALUE` fields in one datagram; False if disabled or the send failed."""
        if self._address is None or not fields:
            return False
        payload = "\n".join(fields).encode("utf-8", errors="replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Never block the event loop: a full socket buffer drops this message instead.
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: the socket is bound and the queue recovered (also ends a reload)."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(f"STATUS={_one_line(status)}")
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        """STATUS=: free text shown by `systemctl status`."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """WATCHDOG=1: the keep-alive ping that WatchdogSec= expects."""
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        """RELOADING=1 at the start of a SIGHUP reload; call ready() when it is done.

        MONOTONIC_USEC is required by Type=notify-reload (systemd >= 253) to tie the
        message to this reload; older managers ignore the extra field.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1 as soon as shutdown starts, so systemd reports "deactivating"."""
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(f"STATUS={_one_line(status)}")
        return self.notify(*fields)

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC=: ask for more time during a long start-up or stop."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """The watchdog timeout in seconds from $WATCHDOG_USEC, or None if there is no watchdog.

    $WATCHDOG_PID, when set, names the process the watchdog is meant for: a child that
    inherited the environment must not think it owns the parent's watchdog.
    """
    env = os.environ if environ is None else environ
    raw_usec = env.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid:
        try:
            if int(raw_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


async def watchdog_loop(
    notifier: Notifier, interval: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Ping the watchdog every `interval / 2` seconds until cancelled.

    It runs as a task on the daemon's own event loop on purpose: if the loop is blocked or
    stuck, the pings stop and systemd restarts the service. Half the interval is what
    sd_watchdog_enabled(3) recommends, leaving room for one late ping. `sleep` is the
    loop's own (tests pass one they control).
    """
    if interval <= 0:
        raise ValueError("watchdog interval must be positive")
    while True:
        notifier.watchdog()
        await sleep(interval / 2)
