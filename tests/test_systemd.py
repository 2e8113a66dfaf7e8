"""sd_notify against a real datagram socket owned by the test, and the watchdog helpers."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.systemd import Notifier, watchdog_interval, watchdog_loop
from tests.conftest import pending_datagrams

REPO = Path(__file__).resolve().parent.parent


def _receive(sock: socket.socket) -> list[str]:
    """One datagram, split into its KEY=VALUE fields."""
    data = sock.recv(4096)
    return data.decode().split("\n")


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(2)
        yield sock, address


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"forwarder-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        yield sock, "@" + name


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest,
    path_socket: tuple[socket.socket, str],
    abstract_socket: tuple[socket.socket, str],
) -> tuple[socket.socket, str]:
    return path_socket if request.param == "path" else abstract_socket


def test_every_message_reaches_the_socket(notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled

    assert notifier.ready("accepting mail on 127.0.0.1:2525")
    assert _receive(sock) == ["READY=1", "STATUS=accepting mail on 127.0.0.1:2525"]
    assert notifier.status("queue: 3 messages")
    assert _receive(sock) == ["STATUS=queue: 3 messages"]
    assert notifier.watchdog()
    assert _receive(sock) == ["WATCHDOG=1"]
    assert notifier.stopping()
    assert _receive(sock) == ["STOPPING=1"]
    assert notifier.extend_timeout(1.5)
    assert _receive(sock) == ["EXTEND_TIMEOUT_USEC=1500000"]


def test_reloading_carries_the_monotonic_clock(path_socket: tuple[socket.socket, str]) -> None:
    sock, address = path_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier({"NOTIFY_SOCKET": address}).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = _receive(sock)
    assert fields[0] == "RELOADING=1"
    key, _, value = fields[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_cannot_inject_other_fields(path_socket: tuple[socket.socket, str]) -> None:
    sock, address = path_socket
    Notifier({"NOTIFY_SOCKET": address}).status("bad\nREADY=1")
    assert _receive(sock) == ["STATUS=bad READY=1"]


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative"}])
def test_without_notify_socket_everything_is_a_noop(environ: dict[str, str]) -> None:
    notifier = Notifier(environ)
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.reloading()
    assert not notifier.stopping()


def test_defaults_to_the_process_environment(
    monkeypatch: pytest.MonkeyPatch, path_socket: tuple[socket.socket, str]
) -> None:
    sock, address = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert Notifier().ready()
    assert _receive(sock) == ["READY=1"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not Notifier().enabled


def test_send_failure_returns_false_instead_of_raising(tmp_path: Path) -> None:
    # Nobody listens there: systemd went away, or the path is wrong.
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert notifier.ready() is False
    assert Notifier({"NOTIFY_SOCKET": "@" + uuid.uuid4().hex}).watchdog() is False


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4242"}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # someone else's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ, pid=4242) == expected


def test_watchdog_interval_checks_our_own_pid_by_default() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 2.0
    assert watchdog_interval({**env, "WATCHDOG_PID": str(os.getpid() + 1)}) is None


class Sleeps:
    """A sleep for watchdog_loop that records each duration asked for and ends only when
    the test says so: the test holds the time, not the wall clock."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self._go = asyncio.Semaphore(0)
        self._asleep = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        self._asleep.set()
        await self._go.acquire()

    async def asleep(self) -> None:
        """Wait until the loop is in a sleep."""
        await asyncio.wait_for(self._asleep.wait(), 10)
        self._asleep.clear()

    def end_one(self) -> None:
        self._go.release()


async def test_watchdog_loop_pings_once_per_half_interval(
    path_socket: tuple[socket.socket, str],
) -> None:
    """A ping, then a sleep of interval/2, then the next ping: never faster, and nothing
    while a sleep has not ended."""
    sock, address = path_socket
    sock.setblocking(False)
    sleeps = Sleeps()
    task = asyncio.create_task(
        watchdog_loop(Notifier({"NOTIFY_SOCKET": address}), 0.1, sleep=sleeps))
    try:
        for _ in range(3):
            await sleeps.asleep()
            assert pending_datagrams(sock) == [b"WATCHDOG=1"]  # exactly one ping per sleep
            sleeps.end_one()
        assert sleeps.asked == [0.05, 0.05, 0.05]
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watchdog_loop_stops_when_the_loop_is_stuck(
    path_socket: tuple[socket.socket, str],
) -> None:
    """The pings are the event loop's own work: blocked past the moment the next ping was
    due, as a stuck daemon would be, the loop sends none."""
    sock, address = path_socket
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    due: list[float] = []

    async def sleep(seconds: float) -> None:
        due.append(loop.time() + seconds)
        await asyncio.sleep(seconds)

    task = asyncio.create_task(
        watchdog_loop(Notifier({"NOTIFY_SOCKET": address}), 0.1, sleep=sleep))
    await asyncio.sleep(0)  # the task's first step: one ping, then its sleep
    assert len(due) == 1
    while loop.time() < due[0] + 0.05:  # deliberately block the event loop
        time.sleep(0.01)  # noqa: ASYNC251
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pending_datagrams(sock) == [b"WATCHDOG=1"]


async def test_watchdog_loop_rejects_a_nonpositive_interval() -> None:
    with pytest.raises(ValueError):
        await watchdog_loop(Notifier({}), 0)


def test_example_config_loads() -> None:
    # The unit points --config at the installed copy of this file; it must stay valid.
    from forwarder.config import load_settings

    settings = load_settings(REPO / "systemd" / "forwarder.toml.example", environ={})
    assert settings.metrics_listen is not None
    assert settings.metrics_listen.host == "127.0.0.1"


def test_unit_matches_the_daemon_contract() -> None:
    unit = (REPO / "systemd" / "forwarder.service").read_text()
    lines = set(unit.splitlines())
    assert "Type=notify" in lines
    assert "NotifyAccess=main" in lines
    assert "WatchdogSec=30s" in lines
    assert (
        "ExecStart=/usr/bin/forwarder serve --config /etc/forwarder/forwarder.toml"
        " --state-dir /var/lib/forwarder"
    ) in lines
    # Longer than the daemon's 30 s graceful stop, or systemd SIGKILLs sessions in flight.
    stop = next(line for line in lines if line.startswith("TimeoutStopSec="))
    assert int(stop.removeprefix("TimeoutStopSec=").removesuffix("s")) > 30
