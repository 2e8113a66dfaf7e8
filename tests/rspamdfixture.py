"""pytest plugin: a real rspamd (Debian's package) on loopback, one for the test session.

Its configuration is minimal and local: no modules that use the network, no Redis, DNS
pointed at a closed loopback port, hyperscan off (it would compile databases for seconds on
a fresh machine; PCRE starts in well under a second). Besides rspamd's built-in GTUBE
(action reject), two Lua rules let a test choose the verdict from a header of its message:
`X-Test-Score: N` adds N to the score, `X-Test-Action: soft reject` (or any action) sets it.
A third scores what rspamd was told about the envelope and our Authentication-Results, so a
test can see that they arrived (FORWARDER_ENVELOPE, 0.25, and FORWARDER_AUTH_RESULTS, 0.5).

rspamd refuses to run its workers as root: when the tests run as root (CI), it is started
with `-u _rspamd -g _rspamd`, the user Debian's package creates, in a directory that user
owns.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT = 30.0
USER = "_rspamd"

LUA_RULES = """
rspamd_config:register_symbol({
  name = 'FORWARDER_TEST_SCORE', score = 1.0,
  callback = function(task)
    local h = task:get_header('X-Test-Score')
    if h then task:insert_result('FORWARDER_TEST_SCORE', tonumber(h)) end
  end,
})
rspamd_config:register_symbol({
  name = 'FORWARDER_TEST_ACTION', type = 'prefilter',
  callback = function(task)
    local a = task:get_header('X-Test-Action')
    if a then task:set_pre_result(a, 'test action') end
  end,
})
rspamd_config:register_symbol({
  name = 'FORWARDER_ENVELOPE', score = 0.25,
  callback = function(task)
    local ip = task:get_from_ip()
    local from = task:get_from('smtp')
    local rcpts = task:get_recipients('smtp')
    if ip and tostring(ip) == '127.0.0.1' and task:get_helo() == 'client.test'
        and from and from[1] and from[1].addr == 'a@sender.example'
        and rcpts and #rcpts == 1 and task:get_queue_id() then
      return true
    end
    return false
  end,
})
rspamd_config:register_symbol({
  name = 'FORWARDER_AUTH_RESULTS', score = 0.5,
  callback = function(task)
    local ar = task:get_header('Authentication-Results')
    return ar ~= nil and string.find(ar, 'forwarder.test', 1, true) == 1
  end,
})
"""

CONFIG = """
options {{
  pidfile = "{dir}/rspamd.pid";
  filters = "";
  dns {{ nameserver = ["127.0.0.1:9"]; timeout = 1s; retransmits = 1; }}
  history_file = "{dir}/history";
  cache_file = "{dir}/symbols.cache";
  tempdir = "{dir}";
  control_socket = "";
  disable_hyperscan = true;
}}
logging {{ type = "file"; filename = "{dir}/rspamd.log"; level = "error"; }}
worker "normal" {{ bind_socket = "127.0.0.1:{port}"; count = 1; }}
actions {{ reject = 15; add_header = 6; greylist = 4; }}
lua = "{dir}/rules.lua";
"""


@dataclass(frozen=True)
class Rspamd:
    url: str
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def _as_user(workdir: Path) -> list[str]:
    """rspamd's options to drop root (and the directory handed to that user)."""
    if os.geteuid() != 0:
        return []
    try:
        user, group = pwd.getpwnam(USER), grp.getgrnam(USER)
    except KeyError:
        pytest.fail(f"running as root, and there is no {USER} user to run rspamd as "
                    "(Debian's rspamd package creates it: .ci/run installs it)")
    for path in [workdir, *workdir.iterdir()]:
        os.chown(path, user.pw_uid, group.gr_gid)
    return ["-u", USER, "-g", USER]


@pytest.fixture(scope="session")
def rspamd() -> Iterator[Rspamd]:
    binary = shutil.which("rspamd")
    if binary is None:  # a failure, not a skip: CI must run these tests
        pytest.fail("rspamd is not installed (apt-get install rspamd; .ci/run does)")
    workdir = Path(tempfile.mkdtemp(prefix="forwarder-rspamd-"))
    workdir.chmod(0o755)
    port = _free_port()
    (workdir / "rules.lua").write_text(LUA_RULES)
    (workdir / "rspamd.conf").write_text(CONFIG.format(dir=workdir, port=port))
    argv = [binary, "-f", "-c", str(workdir / "rspamd.conf"), "--var", f"DBDIR={workdir}",
            "--var", f"RUNDIR={workdir}", "--var", f"LOGDIR={workdir}", *_as_user(workdir)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = workdir / "rspamd.log"
                tail = log.read_text()[-2000:] if log.exists() else "(no log)"
                pytest.fail(f"rspamd did not start (exit {proc.returncode}): {tail}")
            time.sleep(0.05)
        yield Rspamd(f"http://127.0.0.1:{port}", workdir / "rspamd.log")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
