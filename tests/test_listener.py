"""The listening socket as `forwarder serve` runs it, with and without acceptor processes:
one daemon per address, the backlog asked for, caps that hold for the daemon as a whole,
and acceptors that never outlive the main process. `ss` (iproute2) reads the kernel's view."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from forwarder.config import ConfigError, Settings, settings_from_mapping
from forwarder.directory import Directory
from tests.conftest import DOMAIN, Sink, simple_message, smtp_send, until
from tests.test_service import GRAD, Service, config_text

Client = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def ss(*args: str) -> str:
    return subprocess.run(["ss", "-H", *args], capture_output=True, text=True,
                          check=True).stdout


def listen_backlog(port: int) -> int:
    """Send-Q of a listening socket is its backlog (ss(8))."""
    (line,) = ss("-ltn", f"sport = :{port}").splitlines()
    return int(line.split()[2])


def holders(port: int) -> collections.Counter[int]:
    """How many of the daemon's established SMTP connections each process holds."""
    out = ss("-tnp", "state", "established", f"sport = :{port}")
    return collections.Counter(int(pid) for pid in re.findall(r"pid=(\d+)", out))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def connect(port: int) -> tuple[Client, bytes]:
    """A client that says nothing: the connection and the server's first line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return (reader, writer), await asyncio.wait_for(reader.readline(), 10)


async def start(svc: Service) -> Service:
    await svc.start()
    await svc.wait_notify("READY=1", timeout=20)
    return svc


def acceptor_pids(svc: Service) -> list[int]:
    return [int(str(e["pid"])) for e in svc.logs if e.get("event") == "acceptor_started"]


async def exit_code(svc: Service) -> int:
    """A daemon expected to exit on its own: its code (killed if it does not, in 20 s)."""
    assert svc.proc is not None
    try:
        await asyncio.wait_for(svc.proc.wait(), 20)
    finally:
        if svc.proc.returncode is None:
            svc.proc.kill()
    return await svc.close()


async def gone(pid: int, timeout: float = 10.0) -> None:
    async def _wait() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            await asyncio.sleep(0.02)
    await asyncio.wait_for(_wait(), timeout)


@pytest.mark.parametrize("acceptors", [0, 1])
async def test_a_second_daemon_on_a_busy_address_exits_at_once(
    tmp_path: Path, sink: Sink, acceptors: int,
) -> None:
    directory = Directory(tmp_path / "first" / "state" / "directory.sqlite3", actor="test")
    directory.add(GRAD, ["jd@perso.example"])
    directory.delete(GRAD)
    extra = f"acceptors = {acceptors}\n"
    first = await start(Service(tmp_path / "first",
                                config_text([DOMAIN], smarthost=sink.port, extra=extra)))
    try:
        # Another state directory, the same address: a test instance, a second unit.
        text = config_text([DOMAIN], smarthost=sink.port, extra=extra).replace(
            "127.0.0.1:0", f"127.0.0.1:{first.port}", 1)
        second = Service(tmp_path / "second", text)
        began = time.monotonic()
        await second.start()
        assert await exit_code(second) == 1
        assert time.monotonic() - began < 10
        (line,) = second.logs
        assert line["event"] == "start_failed" and line["level"] == "error"
        assert line["error"] == (f"cannot listen on 127.0.0.1:{first.port}: address already "
                                 "in use (another mail server, or another forwarder, listens "
                                 "there)")
        assert not (second.state_dir / "queue.sqlite3").exists()  # nothing else was opened
        # Every connection still reaches the first daemon, and its mail its own queue.
        for i in range(10):
            _, data = await smtp_send(first.port, "noreply@jobteaser.com", [GRAD],
                                      simple_message(msgid=f"<{i}@jobteaser.test>"))
            assert data is not None and data[0] == 250
        await sink.wait_for(10)
    finally:
        assert await first.close() == 0


@pytest.mark.parametrize("acceptors", [0, 1])
async def test_the_backlog_is_the_configured_one(tmp_path: Path, acceptors: int) -> None:
    extra = f"acceptors = {acceptors}\nlisten_backlog = 333\n"
    svc = await start(Service(tmp_path, config_text([DOMAIN], extra=extra)))
    try:
        # Every process listens on the one socket with the configured backlog (asyncio
        # would reset it to its default of 100 in each process that starts serving).
        assert listen_backlog(svc.port) == 333
        svc.config.write_text(svc.config.read_text().replace("333", "444"))
        svc.signal(signal.SIGHUP)
        await svc.wait_log("reloaded")
        assert listen_backlog(svc.port) == 444
    finally:
        assert await svc.close() == 0


async def test_acceptors_die_with_the_main_process_even_when_they_cannot_run(
    tmp_path: Path,
) -> None:
    """SIGKILL the main process while its acceptors are stopped (as a busy or blocked
    process would be, they cannot notice anything themselves): they die with it, and a
    restart binds the same address at once."""
    text = config_text([DOMAIN], extra="acceptors = 2\n").replace(
        "127.0.0.1:0", f"127.0.0.1:{free_port()}", 1)
    svc = await start(Service(tmp_path / "first", text))
    pids = acceptor_pids(svc)
    assert len(pids) == 2
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        svc.signal(signal.SIGKILL)
        assert await svc.close() == -signal.SIGKILL
        for pid in pids:
            await gone(pid, timeout=5)
    finally:
        for pid in pids:  # what a failure would leave behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    again = await start(Service(tmp_path / "again", text, state_dir=svc.state_dir))
    assert await again.close() == 0


async def test_an_acceptor_still_starting_never_holds_the_port(tmp_path: Path) -> None:
    """The listening socket is handed over only once an acceptor dies with its main
    process: one stopped while starting, and orphaned, does not keep a restart out."""
    text = config_text([DOMAIN], extra="acceptors = 1\n").replace(
        "127.0.0.1:0", f"127.0.0.1:{free_port()}", 1)
    svc = Service(tmp_path / "first", text)
    await svc.start()
    pid = int(str((await svc.wait_log("acceptor_started"))["pid"]))
    try:
        os.kill(pid, signal.SIGSTOP)  # a slow start, frozen before it asked for the socket
        assert svc.proc is not None
        svc.proc.kill()
        await gone(svc.proc.pid)  # (its wait() ends only when the orphan closes the pipe)
        again = await start(Service(tmp_path / "again", text, state_dir=svc.state_dir))
        assert await again.close() == 0
    finally:
        os.kill(pid, signal.SIGKILL)  # the orphan, which holds the log pipe
    assert await svc.close() == -signal.SIGKILL


async def test_500_idle_connections_from_one_address_are_admitted_across_processes(
    tmp_path: Path,
) -> None:
    """Caps of 600 in all and 600 per client, two accepting processes: the 600 configured
    are the 600 admitted, however the kernel spreads them, and the 601st is refused."""
    extra = ("acceptors = 2\n[limits]\nmax_connections = 600\n"
             "max_connections_per_client = 600\n")
    svc = await start(Service(tmp_path, config_text([DOMAIN], extra=extra)))
    clients: list[Client] = []
    try:
        opened = await asyncio.gather(*(connect(svc.port) for _ in range(500)))
        clients += [client for client, _ in opened]
        assert collections.Counter(line[:4] for _, line in opened) == {b"220 ": 500}
        held = holders(svc.port)
        assert set(held) == set(acceptor_pids(svc))  # both acceptors hold some of them
        # (and the main process none: it stopped accepting once they served the socket)
        for _ in range(100):  # one at a time: the exact edge
            client, line = await connect(svc.port)
            clients.append(client)
            assert line.startswith(b"220 ")
        refused, line = await connect(svc.port)
        clients.append(refused)
        assert line.startswith(b"421 4.7.0")
    finally:
        for _, writer in clients:
            writer.close()
        assert await svc.close() == 0


async def test_the_per_client_cap_holds_across_processes_and_a_killed_acceptor_frees_its_places(
    tmp_path: Path,
) -> None:
    extra = "acceptors = 1\n[limits]\nmax_connections_per_client = 20\n"
    svc = await start(Service(tmp_path, config_text([DOMAIN], extra=extra)))
    clients: list[Client] = []

    async def fill_to_the_cap() -> None:
        while True:
            client, line = await connect(svc.port)
            if not line.startswith(b"220 "):
                client[1].close()
                assert line.startswith(b"421 4.7.0")
                return
            clients.append(client)

    try:
        await fill_to_the_cap()
        assert len(clients) == 20
        held = holders(svc.port)
        (acceptor,) = acceptor_pids(svc)
        assert held == {acceptor: 20}  # the main process stopped accepting once it served
        # An acceptor killed outright: its connections close, and their places are free
        # again as soon as the main process has reaped it; the main process accepts until
        # the acceptor's successor is ready.
        os.kill(acceptor, signal.SIGKILL)
        await svc.wait_log("acceptor_exited")
        await until(lambda: all(r.at_eof() for r, _ in clients))
        for _, writer in clients:
            writer.close()
        clients = []
        await svc.wait_log_count("main_accepting", 2)  # off at the start, on again now
        await fill_to_the_cap()
        assert len(clients) == 20
        assert svc.proc is not None and holders(svc.port)[svc.proc.pid] > 0
        # Its successor starts from zero: all 20 again, wherever they land.
        await svc.wait_log_count("acceptor_ready", 2)
        ended = sum(1 for e in svc.logs if e.get("event") == "disconnect")
        for _, writer in clients:
            writer.close()
        clients = []
        await svc.wait_log_count("disconnect", ended + 20)
        await fill_to_the_cap()
        assert len(clients) == 20
        assert holders(svc.port)[acceptor_pids(svc)[1]] > 0
    finally:
        for _, writer in clients:
            writer.close()
        assert await svc.close() == 0


@pytest.mark.parametrize("acceptors", [0, 1])
async def test_a_busy_metrics_address_stops_the_start_cleanly(
    tmp_path: Path, acceptors: int,
) -> None:
    """A failure after the databases are open releases them: exit 1, one line, no hang."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        text = config_text([DOMAIN], extra=f"acceptors = {acceptors}\n").replace(
            'metrics_listen = "127.0.0.1:0"', f'metrics_listen = "127.0.0.1:{port}"')
        svc = Service(tmp_path, text)
        await svc.start()
        assert await exit_code(svc) == 1
    (line,) = svc.logs
    assert line["event"] == "start_failed"
    assert line["error"] == (f"cannot serve metrics on 127.0.0.1:{port}: address already "
                             "in use (another program listens there)")


@pytest.mark.parametrize("bad", [0, -1, 65536, "1024", True, 1.5])
def test_listen_backlog_is_a_whole_number_of_connections(bad: object) -> None:
    assert Settings().listen_backlog == 1024  # Postfix asks for 100; bursts of 500 happen
    assert settings_from_mapping({"listen_backlog": 100}).listen_backlog == 100
    with pytest.raises(ConfigError, match="listen_backlog: must be a whole number from 1 to"):
        settings_from_mapping({"listen_backlog": bad})
