"""Did the last run die of a fault of its own? Crash blame (policy.blame) needs to know.

A message is only ever charged for a crash raised while processing it. A Python exception
in a delivery worker is caught where it happens; a fatal fault (a segmentation fault in
a C extension, an abort, the SIGABRT systemd's watchdog sends a stuck loop) kills the
process, and Python's faulthandler then writes the threads' tracebacks to a file. So the
main process keeps that file open from start-up; at the next start, a report in it means
the process died of a fault of its own, and an empty file that it was killed from outside
(SIGKILL, the OOM killer, power loss), which is nobody's fault.
"""

from __future__ import annotations

import contextlib
import faulthandler
from pathlib import Path
from typing import TextIO

FAULT_FILE = "fault-report"
_KEPT = 4096  # octets of a report quoted in the log


class FaultRecord:
    """The fault report of the daemon's main process, in its state directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None

    def read(self) -> str | None:
        """The last run's report, if it died of a fault."""
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return None
        return text[:_KEPT] if text.strip() else None

    def clear(self) -> None:
        """The report was acted on: the next start must not act on it again."""
        with contextlib.suppress(FileNotFoundError):
            self.path.write_text("")

    def arm(self) -> None:
        """From now on a fatal fault is written to the file (faulthandler); the last
        run's report, acted on, is emptied."""
        self._file = open(self.path, "w")  # noqa: SIM115 (kept open for the fault handler)
        faulthandler.enable(self._file, all_threads=True)

    def disarm(self) -> None:
        """A clean stop: nothing to report."""
        if self._file is not None:
            faulthandler.disable()
            self._file.close()
            self._file = None
