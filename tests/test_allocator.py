"""The allocator's tuning (forwarder/daemonparts.py `tune_malloc`): with it, the buffers a
big body passes through (256 KiB reads, their copies) reuse the heap instead of faulting
fresh pages in for every message; glibc's own settings in the environment win. Each case
runs in a process of its own, since mallopt(3) is for the whole process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")

# Twenty 256 KiB buffers made and dropped, as a 5 MB body's reads are, over and over:
# the minor page faults of the last twenty rounds, once the heap has warmed up.
ROUNDS = """
import resource
from forwarder.daemonparts import tune_malloc
tuned = tune_malloc()
def one_round():
    buffers = [bytes(256 * 1024) + b"x" for _ in range(20)]
    buffers.clear()
for _ in range(5):
    one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    one_round()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(tune: bool, env: dict[str, str] | None = None) -> tuple[bool, int]:
    script = ROUNDS if tune else ROUNDS.replace("tuned = tune_malloc()", "tuned = False")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", script], env={**environment, **(env or {})},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_tuned_allocator_reuses_the_heap_for_body_sized_buffers() -> None:
    untuned_tuned, untuned_faults = _run(tune=False)
    tuned, tuned_faults = _run(tune=True)
    assert tuned and not untuned_tuned
    # 20 rounds x 20 buffers x 64 pages would fault 25,600 pages if nothing were reused.
    assert untuned_faults > 5000
    assert tuned_faults < 500


def test_the_environment_wins_over_the_tuning() -> None:
    tuned, _ = _run(tune=True, env={"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert not tuned


# The systemd unit has MemoryDenyWriteExecute=yes: the tuning goes through ctypes, which
# must need no memory both writable and executable. PR_SET_MDWE (Linux 6.3) is the same
# rule set from inside the process; where the kernel lacks it, the case is skipped.
UNDER_MDWE = """
import ctypes, mmap, sys
if ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, REFUSE_EXEC_GAIN
    print("unsupported")
    sys.exit()
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("not enforced")
except OSError:
    from forwarder.daemonparts import tune_malloc
    print("tuned" if tune_malloc() else "untuned")
"""


def test_the_tuning_works_where_memory_cannot_be_writable_and_executable() -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", UNDER_MDWE], env=environment,
                         capture_output=True, text=True, check=True).stdout.strip()
    if out in ("unsupported", "not enforced"):
        pytest.skip(f"PR_SET_MDWE {out} on this kernel")
    assert out == "tuned"
