"""pytest plugin: a real authoritative DNS server on loopback (see tests/dnsserver.py).

Enabled from tests/conftest.py with ``pytest_plugins = ["tests.dnsfixtures"]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.dnsserver import DnsServer


@pytest_asyncio.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    """A started server with an empty zone: fill it with ``set_records`` in the test.

    Point a resolver at ``dns_server.host`` / ``dns_server.port`` (UDP and TCP share it).
    """
    async with DnsServer() as server:
        yield server
