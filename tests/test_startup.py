"""A start that fails exits at once: non-zero, one log line saying why, and nothing left
behind (no process holding the state lock, no database thread keeping it alive).

Each case runs the real `forwarder serve` in a subprocess with a deadline: before, a
database thread opened before the failure kept the process alive, ignoring SIGTERM, with
the state lock held, so systemd's restart found the lock taken.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DEADLINE = 15.0  # seconds; a failed start takes about 2 (the interpreter and imports)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def serve(state_dir: Path, *extra: str, config: str = "") -> tuple[int, list[dict[str, object]]]:
    """`forwarder serve` until it exits (killed at DEADLINE: a failure of the test)."""
    config_file = state_dir.parent / "forwarder.toml"
    config_file.write_text('dns_servers = ["127.0.0.1:9"]\n' + config)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "forwarder.cli", "serve", "--config", str(config_file),
         "--state-dir", str(state_dir), "--acceptors", "0", *extra],
        capture_output=True, timeout=DEADLINE, check=False)
    assert time.monotonic() - started < DEADLINE
    events = [json.loads(line) for line in done.stdout.decode().splitlines()
              if line.startswith("{")]
    return done.returncode, events


def lock_is_free(state_dir: Path) -> bool:
    fd = os.open(state_dir / "forwarder.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def one_failure(events: list[dict[str, object]]) -> str:
    failures = [e for e in events if e.get("event") == "start_failed"]
    assert len(failures) == 1, events
    assert not any(e.get("event") == "listening" for e in events)
    return str(failures[0]["error"])


def test_port_in_use(tmp_path: Path, busy_port: int) -> None:
    state = tmp_path / "state"
    code, events = serve(state, "--listen", f"127.0.0.1:{busy_port}")
    assert code == 1
    assert "address already in use" in one_failure(events)
    assert lock_is_free(state)


def test_missing_tls_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    code, events = serve(state, "--listen", "127.0.0.1:0",
                         config=f'tls_cert = "{tmp_path}/none.pem"\n'
                                f'tls_key = "{tmp_path}/none.key"\n')
    assert code == 1
    error = one_failure(events)
    assert "none.pem" in error and "No such file" in error
    assert lock_is_free(state)


def test_corrupt_queue(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "queue.sqlite3").write_bytes(b"not a database, " * 64)
    code, events = serve(state, "--listen", "127.0.0.1:0")
    assert code == 1
    assert "file is not a database" in one_failure(events)
    assert lock_is_free(state)
