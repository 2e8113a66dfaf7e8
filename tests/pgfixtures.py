"""pytest fixtures for the tests that need PostgreSQL (several nodes, docs/cluster.md):
one throwaway cluster for the session (tests/pgcluster.py) and a fresh database per test.

Skipped only where PostgreSQL's binaries are absent; CI (`.ci/run`) installs them and
sets FORWARDER_REQUIRE_POSTGRESQL=1, so that there a missing server fails instead.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from tests.pgcluster import PASSWORD, PgCluster, pg_bin

_names = itertools.count(1)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    bindir = pg_bin()
    if bindir is None:
        if os.environ.get("FORWARDER_REQUIRE_POSTGRESQL"):
            pytest.fail("PostgreSQL binaries not found (apt-get install postgresql)")
        pytest.skip("PostgreSQL binaries not found (apt-get install postgresql)")
    cluster = PgCluster(bindir)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A new, empty database on the session's cluster (password: tests.pgcluster.PASSWORD)."""
    return pg_cluster.create_database(f"forwarder_{os.getpid()}_{next(_names)}")


__all__ = ["PASSWORD", "pg_cluster", "pg_url"]
