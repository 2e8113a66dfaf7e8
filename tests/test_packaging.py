"""The Debian package's sources agree with the code and the docs. (The package itself is
built, installed, run and purged for real by .ci/package-check.sh.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from forwarder import __version__
from forwarder.cli import build_parser
from forwarder.config import load_settings

REPO = Path(__file__).resolve().parent.parent
DEBIAN = REPO / "debian"


def test_one_version_everywhere() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == __version__
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"forwarder ({__version__}) ")
    assert f'"forwarder {__version__}"' in (DEBIAN / "forwarder.1").read_text()


def test_the_man_page_names_every_command() -> None:
    page = (DEBIAN / "forwarder.1").read_text()
    choices = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert isinstance(choices, dict)
    for name in choices:
        assert re.search(rf"^\.B {name}\b", page, re.MULTILINE), name


def test_the_unit_the_wrapper_and_the_conffile_agree() -> None:
    unit = (REPO / "systemd" / "forwarder.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.MULTILINE)
    assert exec_start is not None
    argv = exec_start.group(1).split()
    assert argv[:2] == ["/usr/bin/forwarder", "serve"]
    config = argv[argv.index("--config") + 1]
    state_dir = argv[argv.index("--state-dir") + 1]
    wrapper = (DEBIAN / "forwarder.sh").read_text()
    assert f"FORWARDER_CONFIG={config}\n" in wrapper
    assert 'exec /opt/forwarder/bin/forwarder "$@"' in wrapper
    settings = load_settings(REPO / "systemd" / "forwarder.toml.example", environ={})
    assert str(settings.state_dir) == state_dir
    assert f"AssertPathExists={config}" in unit
    # debhelper installs these two from debian/: they must be the checkout's own.
    for name in ("forwarder.service", "forwarder.sysusers"):
        assert (DEBIAN / name).resolve() == (REPO / "systemd" / name).resolve()


def test_every_lintian_override_is_explained_in_admin_md() -> None:
    admin = (REPO / "docs" / "admin.md").read_text()
    lintian = admin[admin.index("### Lintian"):admin.index("### Without Debian")]
    overrides = (DEBIAN / "forwarder.lintian-overrides").read_text().splitlines()
    tags = {line.split()[0] for line in overrides if line and not line.startswith("#")}
    assert tags
    for tag in tags:
        assert f"`{tag}" in lintian, f"override {tag} is not explained in docs/admin.md"
