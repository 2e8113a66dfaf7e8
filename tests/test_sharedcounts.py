"""The session table the daemon's processes share (forwarder/sharedcounts.py), driven as
the processes drive it: the main process's view and an acceptor's view of one memfd."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from forwarder.sharedcounts import WIDTH, CountsError, SharedCounts

KEY = bytes(range(32))  # a fixed hash key: the counters each address uses are known


@pytest.fixture
def views() -> Iterator[tuple[SharedCounts, SharedCounts, SharedCounts]]:
    """The main process's table and two acceptors' views of it (slots 1 and 2)."""
    main = SharedCounts.create(3, key=KEY)
    assert main.fd is not None
    first = SharedCounts.attach(os.dup(main.fd), 1)
    second = SharedCounts.attach(os.dup(main.fd), 2)
    yield main, first, second
    for view in (first, second, main):
        view.close()


def test_one_process_counts_exactly_to_both_caps() -> None:
    table = SharedCounts.create(1)
    assert table.fd is None  # one process: nothing to hand on
    counted = [table.admit("192.0.2.1", 30, 20) for _ in range(21)]
    assert all(c is not None for c in counted[:20]) and counted[20] is None
    assert (table.count("192.0.2.1"), table.total()) == (20, 20)
    others = [table.admit(f"192.0.2.{i}", 30, 20) for i in range(2, 13)]
    assert [c is not None for c in others] == [True] * 10 + [False]  # 30 in all
    first = counted[0]
    assert first is not None
    table.release(first)
    assert table.admit("192.0.2.1", 30, 20) is not None  # the freed place is taken again
    table.close()


def test_caps_hold_across_processes(
    views: tuple[SharedCounts, SharedCounts, SharedCounts],
) -> None:
    main, first, second = views
    # 20 from one address, spread over three processes: the 21st is refused in any.
    for i in range(20):
        assert (main, first, second)[i % 3].admit("198.51.100.7", 600, 20) is not None
    for view in views:
        assert view.admit("198.51.100.7", 600, 20) is None
        assert view.count("198.51.100.7") == 20
    # The total cap is the daemon's: 600 in all, however they fall.
    for i in range(580):
        assert (main, first, second)[i % 2].admit(f"10.0.{i // 250}.{i % 250}", 600, 20)
    assert second.admit("203.0.113.1", 600, 20) is None
    assert main.total() == first.total() == second.total() == 600


def test_a_dead_process_leaves_nothing_behind(
    views: tuple[SharedCounts, SharedCounts, SharedCounts],
) -> None:
    main, first, second = views
    for _ in range(12):
        assert first.admit("198.51.100.7", 600, 20) is not None
    for _ in range(8):
        assert main.admit("198.51.100.7", 600, 20) is not None
    assert second.admit("198.51.100.7", 600, 20) is None
    main.clear(1)  # the main process reaped the first acceptor
    assert (main.count("198.51.100.7"), main.total()) == (8, 8)
    # Its successor in the same slot starts from zero, whatever was left.
    assert main.fd is not None
    for _ in range(3):
        assert first.admit("198.51.100.7", 600, 20) is not None
    successor = SharedCounts.attach(os.dup(main.fd), 1)
    assert main.total() == 8
    for _ in range(12):
        assert successor.admit("198.51.100.7", 600, 20) is not None
    assert second.admit("198.51.100.7", 600, 20) is None
    successor.close()


def test_addresses_rarely_share_a_count() -> None:
    """1000 addresses, one session each: the count of each is its own (a count above the
    truth needs both of an address's counters shared; none here, with this key)."""
    table = SharedCounts.create(1, key=KEY)
    addresses = [f"2001:db8::{i:x}" for i in range(1000)]
    for address in addresses:
        assert table.admit(address, 10_000, 1) is not None
    assert [table.count(a) for a in addresses] == [1] * 1000
    # Each address's two counters: one in each row.
    first, second = table.cells_of(addresses[0])
    assert 0 <= first < WIDTH <= second < 2 * WIDTH
    table.close()


def test_a_table_is_checked_when_attached() -> None:
    main = SharedCounts.create(2)
    assert main.fd is not None
    with pytest.raises(CountsError, match="slot 2 out of range"):
        SharedCounts.attach(os.dup(main.fd), 2)
    main.close()
    fd = os.memfd_create("not-a-table")
    os.ftruncate(fd, 4096)
    with pytest.raises(CountsError, match="not a session count table"):
        SharedCounts.attach(fd, 1)
