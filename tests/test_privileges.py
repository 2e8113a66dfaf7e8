"""Root and file permissions: the CLI run as root acts as the owner of the state directory,
state files are never world-readable whatever the umask, and acceptor processes never
import modules from the working directory."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DOMAIN

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


def cli(*args: str, cwd: Path | None = None, umask: int | None = None,
        ) -> subprocess.CompletedProcess[str]:
    def before() -> None:
        if umask is not None:
            os.umask(umask)
    return subprocess.run([sys.executable, "-P", "-m", "forwarder.cli", *args],
                          capture_output=True, text=True, timeout=60, check=False, cwd=cwd,
                          preexec_fn=before)


@pytest.fixture
def service_dir() -> Iterator[Path]:
    """A state directory owned by another user (nobody), reachable by that user (pytest's
    own temporary directories are private to root)."""
    top = Path(tempfile.mkdtemp(prefix="forwarder-priv-", dir="/tmp"))
    top.chmod(0o755)
    state = top / "state"
    state.mkdir(mode=0o750)
    os.chown(state, NOBODY, NOBODY)
    try:
        yield state
    finally:
        shutil.rmtree(top)


@as_root
def test_root_cli_acts_as_the_owner_of_the_state_dir(service_dir: Path) -> None:
    """Before, a root `account add` or `srs rotate` left root-owned files the daemon (as
    its own user) could not open."""
    added = cli("account", "add", f"marie.curie@{DOMAIN}", "--state-dir", str(service_dir))
    assert added.returncode == 0, added.stderr
    rotated = cli("srs", "rotate", "--state-dir", str(service_dir))
    assert rotated.returncode == 0, rotated.stderr
    files = list(service_dir.iterdir())
    assert {"directory.sqlite3", "srs-secrets"} <= {f.name for f in files}
    assert {(f.name, f.stat().st_uid) for f in files} == {(f.name, NOBODY) for f in files}


@as_root
def test_root_cli_refuses_in_one_line_when_it_cannot_become_the_owner(
        service_dir: Path) -> None:
    """Without the right to change user (here: capabilities dropped by setpriv), it says
    so and touches nothing."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    done = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-setuid,-setgid", sys.executable,
         "-P", "-m", "forwarder.cli", "account", "add", f"marie.curie@{DOMAIN}",
         "--state-dir", str(service_dir)],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert f"{service_dir} belongs to nobody: run this command as nobody" in line
    assert list(service_dir.iterdir()) == []


def test_state_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    state = tmp_path / "state"
    done = cli("account", "add", f"marie.curie@{DOMAIN}", "--state-dir", str(state), umask=0)
    assert done.returncode == 0, done.stderr
    cli("srs", "rotate", "--state-dir", str(state), umask=0)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in state.iterdir()}
    assert modes and all(mode & 0o027 == 0 for mode in modes.values()), modes
    assert modes["srs-secrets"] == 0o600
    assert stat.S_IMODE(state.stat().st_mode) & 0o027 == 0


async def test_acceptors_do_not_import_from_the_working_directory(tmp_path: Path) -> None:
    """A `forwarder` package in the directory the daemon was started from is not what its
    acceptor processes run (before, `python -m` put the working directory first on
    sys.path)."""
    workdir = tmp_path / "cwd"
    (workdir / "forwarder").mkdir(parents=True)
    marker = tmp_path / "imported"
    (workdir / "forwarder" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n")
    (workdir / "forwarder.toml").write_text(
        'listen = "127.0.0.1:0"\nacceptors = 1\ndns_servers = ["127.0.0.1:9"]\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-m", "forwarder.cli", "serve", "--config", "forwarder.toml",
        "--state-dir", str(tmp_path / "state"), cwd=workdir,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None

    async def listening() -> dict[str, object]:
        assert proc.stdout is not None
        async for line in proc.stdout:
            event = json.loads(line) if line.startswith(b"{") else {}
            if event.get("event") == "listening" or marker.exists():
                return event
        return {}

    try:
        event = await asyncio.wait_for(listening(), 30)
        assert not marker.exists()
        assert event.get("acceptors") == 1
    finally:
        proc.terminate()
        await proc.wait()
