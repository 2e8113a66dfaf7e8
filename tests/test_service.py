"""The daemon as systemd runs it: a real `forwarder serve` subprocess with NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forwarder.directory import Directory
from forwarder.targets import TargetState
from forwarder.tokens import Binding, TokenKind, make_token
from tests.conftest import DOMAIN, Sink, simple_message, smtp_send

GRAD = f"jean.dupont@{DOMAIN}"


class Service:
    """`forwarder serve` in a subprocess, with a notify socket owned by the test."""

    def __init__(self, tmp_path: Path, config: str, state_dir: Path | None = None) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_path
        self.state_dir = state_dir or tmp_path / "state"
        self.config = tmp_path / "forwarder.toml"
        self.config.write_text(config)
        self.notify_path = tmp_path / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.setblocking(False)
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.metrics_port = 0
        self.logs: list[dict[str, object]] = []
        self.messages: list[str] = []

    async def start(self, watchdog_usec: int = 200_000) -> None:
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path),
                   WATCHDOG_USEC=str(watchdog_usec))
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "forwarder.cli", "serve", "--config", str(self.config),
            "--state-dir", str(self.state_dir), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        self._reader = asyncio.create_task(self._read_logs())

    async def _read_logs(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.logs.append(event)
            if event.get("event") == "listening":
                self.port = int(str(event["port"]))
            if event.get("event") == "metrics_listening":
                self.metrics_port = int(str(event["port"]))

    async def next_notify(self, timeout: float = 10.0) -> str:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.notify, 4096), timeout)
        text = data.decode()
        self.messages.append(text)
        return text

    async def wait_notify(self, field: str, timeout: float = 10.0) -> str:
        async def _wait() -> str:
            while True:
                text = await self.next_notify(timeout)
                if field in text.split("\n"):
                    return text
        return await asyncio.wait_for(_wait(), timeout)

    async def wait_log(self, event: str, timeout: float = 10.0) -> dict[str, object]:
        async def _wait() -> dict[str, object]:
            while True:
                for entry in self.logs:
                    if entry.get("event") == event:
                        return entry
                await asyncio.sleep(0.02)
        return await asyncio.wait_for(_wait(), timeout)

    async def wait_log_count(self, event: str, count: int, timeout: float = 10.0) -> None:
        async def _wait() -> None:
            while sum(1 for e in self.logs if e.get("event") == event) < count:
                await asyncio.sleep(0.02)
        await asyncio.wait_for(_wait(), timeout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def close(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        await self._reader
        self.notify.close()
        return code


def config_text(domains: list[str], smarthost: int | None = None, extra: str = "") -> str:
    lines = ['listen = "127.0.0.1:0"', f"domains = {json.dumps(domains)}",
             'hostname = "forwarder.test"', 'metrics_listen = "127.0.0.1:0"',
             'dns_servers = ["127.0.0.1:9"]']  # never the machine's resolver
    if smarthost:
        lines.append(f'smarthost = "127.0.0.1:{smarthost}"')
    return "\n".join(lines) + "\n" + extra


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
    raw = await reader.read()
    writer.close()
    text = raw.split(b"\r\n\r\n", 1)[1].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape_until(port: int, expected: Samples, timeout: float = 10.0) -> Samples:
    """Scrape until every expected sample has its value (acceptors report each second)."""
    async def _wait() -> Samples:
        while True:
            samples = await scrape(port)
            if all(samples.get(k) == v for k, v in expected.items()):
                return samples
            await asyncio.sleep(0.1)
    return await asyncio.wait_for(_wait(), timeout)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    svc = Service(tmp_path, config_text([DOMAIN]))
    yield svc
    if svc.proc is not None and svc.proc.returncode is None:
        await svc.close()


async def test_ready_only_once_listening_then_watchdog_then_stopping(service: Service) -> None:
    await service.start()
    ready = await service.wait_notify("READY=1")
    # READY=1 means the port is bound: a client connects at once and gets the greeting.
    assert service.port, "the listening event precedes READY"
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    assert (await reader.readline()).startswith(b"220 ")
    writer.close()
    assert "STATUS=" in ready
    # Pings every WATCHDOG_USEC/2 from the event loop.
    await service.wait_notify("WATCHDOG=1", timeout=2)
    await service.wait_notify("WATCHDOG=1", timeout=2)
    service.signal(signal.SIGTERM)
    await service.wait_notify("STOPPING=1")
    assert await service.close() == 0


async def test_sighup_reloads_config_and_refuses_a_broken_one(service: Service) -> None:
    await service.start()
    await service.wait_notify("READY=1")
    rcpt = "someone@new-school.example"
    rcpts, _ = await smtp_send(service.port, "a@b.example", [rcpt], simple_message())
    assert rcpts[rcpt][0] == 554  # not our domain yet
    service.config.write_text(config_text([DOMAIN, "new-school.example"]))
    processes = 1 + int(str((await service.wait_log("listening"))["acceptors"]))
    service.signal(signal.SIGHUP)
    await service.wait_notify("RELOADING=1")
    # The main process and each acceptor process re-read the file.
    await service.wait_log_count("reloaded", processes)
    rcpts, _ = await smtp_send(service.port, "a@b.example", [rcpt], simple_message())
    assert rcpts[rcpt][0] == 550  # ours now: unknown user, not relay denied
    service.config.write_text("domains = 42\nbogus_key = true\n")
    service.signal(signal.SIGHUP)
    await service.wait_log_count("reload_refused", processes)
    rcpts, _ = await smtp_send(service.port, "a@b.example", [rcpt], simple_message())
    assert rcpts[rcpt][0] == 550  # the old (valid) configuration stays in force
    assert await service.close() == 0


async def test_metrics_scraped_over_http(tmp_path: Path, sink: Sink) -> None:
    svc = Service(tmp_path, config_text([DOMAIN], smarthost=sink.port))
    directory = Directory(tmp_path / "state" / "directory.sqlite3", actor="test")
    directory.add(GRAD, ["jd@perso.example"])
    directory.delete(GRAD)
    await svc.start()
    try:
        await svc.wait_notify("READY=1")
        await svc.wait_log("metrics_listening")
        body = simple_message()
        await smtp_send(svc.port, "noreply@jobteaser.com", [GRAD], body)
        await smtp_send(svc.port, "noreply@jobteaser.com", [f"nobody@{DOMAIN}"], body)
        await sink.wait_for(1)
        await svc.wait_log("delivery")
        expected: Samples = {
            ("forwarder_rcpt_verdicts_total", (("verdict", "forward"),)): 1,
            ("forwarder_rcpt_verdicts_total", (("verdict", "unknown"),)): 1,
            ("forwarder_messages_accepted_total", ()): 1,
            ("forwarder_accepted_bytes_total", ()): len(body),
            ("forwarder_deliveries_total",
             (("destination", "redirect"), ("result", "delivered"))): 1,
        }
        # Acceptor processes report their counts to the main process every second.
        samples = await scrape_until(svc.metrics_port, expected)
        for key, value in expected.items():
            assert samples[key] == value, key
        assert samples[("forwarder_delivery_latency_seconds_count", ())] == 1
    finally:
        assert await svc.close() == 0


@pytest.mark.parametrize("acceptors", [0, 1])
async def test_sigkill_after_250_then_restart_delivers(
    tmp_path: Path, sink: Sink, acceptors: int
) -> None:
    directory = Directory(tmp_path / "state" / "directory.sqlite3", actor="test")
    directory.add(GRAD, ["jd@perso.example"])
    directory.delete(GRAD)
    sink.handler.hang = True  # the destination takes the message but never answers the dot
    extra = f"acceptors = {acceptors}\n"
    svc = Service(tmp_path, config_text([DOMAIN], smarthost=sink.port, extra=extra))
    await svc.start()
    await svc.wait_notify("READY=1")
    _, data = await smtp_send(svc.port, "noreply@jobteaser.com", [GRAD], simple_message())
    assert data is not None and data[0] == 250
    queue_id = data[1].rsplit(" ", 1)[1]
    svc.signal(signal.SIGKILL)  # between our 250 and any delivery: the worst moment
    assert await svc.close() == -signal.SIGKILL
    assert sink.messages == []

    sink.handler.hang = False
    again = Service(tmp_path / "again", config_text([DOMAIN], smarthost=sink.port, extra=extra),
                    state_dir=svc.state_dir)
    await again.start()
    try:
        (got,) = await sink.wait_for(1)
        assert got.rcpt_tos == ["jd@perso.example"]
        assert f"id {queue_id}".encode() in got.content
        if acceptors == 0:
            # One process: the message was leased in memory when it was queued, so the
            # restart must find and recover that lease. (With an acceptor, the kill may
            # come before the main process leased it: then there is nothing to recover.)
            await again.wait_log("queue_recovered")
    finally:
        assert await again.close() == 0


async def test_acceptor_processes_share_the_port_and_are_replaced(
    tmp_path: Path, sink: Sink
) -> None:
    directory = Directory(tmp_path / "state" / "directory.sqlite3", actor="test")
    directory.add(GRAD, ["jd@perso.example"])
    directory.delete(GRAD)
    svc = Service(tmp_path, config_text([DOMAIN], smarthost=sink.port, extra="acceptors = 2\n"))
    await svc.start()
    try:
        await svc.wait_notify("READY=1")
        started = [e for e in svc.logs if e.get("event") == "acceptor_started"]
        assert len(started) == 2
        # Mail accepted by whichever process takes the connection is delivered once.
        for i in range(40):
            _, data = await smtp_send(svc.port, "noreply@jobteaser.com", [GRAD],
                                      simple_message(msgid=f"<{i}@jobteaser.test>"))
            assert data is not None and data[0] == 250
        got = await sink.wait_for(40)
        ids = sorted(m.content.split(b"Message-ID: ")[1].split(b"\r\n")[0] for m in got)
        assert len(set(ids)) == 40
        # An acceptor that dies is replaced, and service goes on.
        victim = int(str(started[0]["pid"]))
        os.kill(victim, signal.SIGKILL)
        await svc.wait_log("acceptor_exited")
        await svc.wait_log_count("acceptor_started", 3)
        _, data = await smtp_send(svc.port, "noreply@jobteaser.com", [GRAD], simple_message())
        assert data is not None and data[0] == 250
        await sink.wait_for(41)
    finally:
        assert await svc.close() == 0
    # No acceptor outlives the main process.
    for entry in svc.logs:
        if entry.get("event") == "acceptor_started":
            with pytest.raises(ProcessLookupError):
                os.kill(int(str(entry["pid"])), 0)


async def test_acceptor_exits_when_main_process_is_killed(tmp_path: Path) -> None:
    svc = Service(tmp_path, config_text([DOMAIN], extra="acceptors = 1\n"))
    await svc.start()
    await svc.wait_notify("READY=1")
    (started,) = [e for e in svc.logs if e.get("event") == "acceptor_started"]
    svc.signal(signal.SIGKILL)
    assert await svc.close() == -signal.SIGKILL

    async def gone() -> None:
        while True:
            try:
                os.kill(int(str(started["pid"])), 0)
            except ProcessLookupError:
                return
            await asyncio.sleep(0.05)
    await asyncio.wait_for(gone(), 10)


async def test_idle_client_is_cut_off_under_the_production_event_loop(tmp_path: Path) -> None:
    """`forwarder serve` runs on uvloop where installed: the deadline path must work there
    too (its transports are not asyncio.Transport instances)."""
    svc = Service(tmp_path, config_text([DOMAIN], extra="[limits]\ncommand_timeout = 1\n"))
    await svc.start()
    try:
        await svc.wait_notify("READY=1")
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        assert (await reader.readline()).startswith(b"220 ")
        reply = await asyncio.wait_for(reader.readline(), 10)
        assert reply.startswith(b"421 4.4.2")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # and closed
        writer.close()
    finally:
        assert await svc.close() == 0


async def test_sigterm_during_data_never_loses_a_250(tmp_path: Path, sink: Sink) -> None:
    directory = Directory(tmp_path / "state" / "directory.sqlite3", actor="test")
    directory.add(GRAD, ["jd@perso.example"])
    directory.delete(GRAD)
    svc = Service(tmp_path, config_text([DOMAIN], smarthost=sink.port))
    await svc.start()
    await svc.wait_notify("READY=1")
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)

    async def say(line: bytes) -> bytes:
        writer.write(line)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10)

    assert (await reader.readline()).startswith(b"220")
    writer.write(b"EHLO slow.client.test\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    assert (await say(b"MAIL FROM:<noreply@jobteaser.com>\r\n")).startswith(b"250")
    assert (await say(f"RCPT TO:<{GRAD}>\r\n".encode())).startswith(b"250")
    assert (await say(b"DATA\r\n")).startswith(b"354")
    writer.write(b"Subject: slow\r\nMessage-ID: <slow@jobteaser.test>\r\n\r\nfirst half\r\n")
    await writer.drain()
    svc.signal(signal.SIGTERM)  # mid-transfer: stop accepting, let this one finish
    await svc.wait_notify("STOPPING=1")
    reply = await say(b"second half\r\n.\r\n")
    writer.close()
    assert reply[:1] in (b"2", b"4"), reply  # completed or deferred, never refused
    assert await svc.close() == 0
    if reply.startswith(b"250"):
        # Accepted: delivered before the stop, or kept in the queue for the next start.
        if not sink.messages:
            again = Service(tmp_path / "again", config_text([DOMAIN], smarthost=sink.port),
                            state_dir=svc.state_dir)
            await again.start()
            try:
                await sink.wait_for(1)
            finally:
                assert await again.close() == 0
        assert b"<slow@jobteaser.test>" in sink.messages[0].content


async def test_an_acceptor_process_consumes_confirmations(tmp_path: Path) -> None:
    """A reply to a notice may reach any accepting process: each applies it itself."""
    directory = Directory(tmp_path / "state" / "directory.sqlite3", actor="test")
    directory.add(GRAD, ["jd@perso.example"])
    directory.delete(GRAD)
    target = directory.require(GRAD).targets[0]
    token = make_token(TokenKind.CONFIRM, target.id,
                       Binding(GRAD, target.target, target.declared_at), time.time() + 86400,
                       directory.token_secrets()[0])
    svc = Service(tmp_path, config_text([DOMAIN], extra="acceptors = 1\n"))
    await svc.start()
    try:
        await svc.wait_notify("READY=1")
        svc.signal(signal.SIGSTOP)  # the main process takes no connection: the acceptor does
        try:
            confirm = f"confirm+{token}@{DOMAIN}"
            rcpts, data = await smtp_send(svc.port, "jd@perso.example", [confirm],
                                          b"Subject: Re: forwarding\r\n\r\nyes, me\r\n")
            assert rcpts[confirm][0] == 250 and data is not None and data[0] == 250
            assert directory.require(GRAD).targets[0].state is TargetState.CONFIRMED
        finally:
            svc.signal(signal.SIGCONT)
    finally:
        assert await svc.close() == 0
    (consumed,) = [e for e in svc.logs if e.get("event") == "token_consumed"]
    assert consumed["state"] == "confirmed" and consumed["client"] == "127.0.0.1"
