"""Who the `forwarder` command acts as, and the modes of the files it creates.

Every file in the state directory belongs to the service's user: a root-owned database or
secrets file, left by an administrator's `sudo forwarder account add`, locks the daemon out
at its next start. So when run as root on a state directory owned by another user, the
command becomes that user (its uid, its primary group and its groups) before touching
anything, as `sudo -u forwarder` would; when that is impossible it refuses, in one line.

State files are created 0640 (SQLite databases, spool files) or 0600 (secrets, locks)
whatever the caller's umask: the umask is narrowed to at least 027 at start, so a shell
with umask 022 or 000 cannot leave a directory world-readable.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

# Nothing is group-writable or readable by others (systemd's unit sets UMask=0027 too).
STATE_UMASK = 0o027


class PrivilegeError(Exception):
    """Running as root on another user's state directory, and unable to become them."""


def restrict_umask() -> None:
    os.umask(os.umask(STATE_UMASK) | STATE_UMASK)


def act_as_owner(state_dir: Path) -> str | None:
    """As root, become the owner of `state_dir` if it is someone else; return their name
    (None: nothing changed). Raises PrivilegeError."""
    if os.geteuid() != 0:
        return None
    try:
        owner = os.stat(state_dir)
    except FileNotFoundError:
        return None  # a new state directory: whoever creates it owns it
    if owner.st_uid == 0:
        return None
    try:
        entry: pwd.struct_passwd | None = pwd.getpwuid(owner.st_uid)
    except KeyError:
        entry = None
    name = entry.pw_name if entry is not None else str(owner.st_uid)
    gid = entry.pw_gid if entry is not None else owner.st_gid
    try:
        if entry is not None:
            os.initgroups(entry.pw_name, gid)
        else:
            os.setgroups([gid])
        os.setgid(gid)
        os.setuid(owner.st_uid)
    except OSError as exc:
        raise PrivilegeError(
            f"{state_dir} belongs to {name}: run this command as {name} (as root it could "
            f"not switch to that user: {exc.strerror})") from exc
    os.environ["HOME"] = entry.pw_dir if entry is not None else "/"
    return name
