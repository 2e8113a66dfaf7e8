"""What counting a connection against the caps costs: `Connections.admit` + `release`, as
the SMTP front calls them once per connection, with the session table shared by 1 to 3
processes (forwarder/sharedcounts.py). Usage: .venv/bin/python bench/admit_cost.py"""

from __future__ import annotations

import timeit

from forwarder import log
from forwarder.config import Limits
from forwarder.connections import Connections
from forwarder.sharedcounts import SharedCounts


class Session:
    def close_if_idle(self) -> None:
        pass

    def abort(self) -> None:
        pass


def per_connection(connections: Connections, clients: list[str], n: int) -> float:
    limits = Limits(max_connections=10_000, max_connections_per_client=10_000)
    sessions = [Session() for _ in range(64)]

    def one(i: list[int] = [0]) -> None:  # noqa: B006  (a counter kept between calls)
        i[0] += 1
        session, client = sessions[i[0] % 64], clients[i[0] % len(clients)]
        connections.admit(session, client, limits)
        connections.release(session, client)

    # The best of several runs: the machine is shared, and noise only ever adds.
    return min(timeit.repeat(one, number=n, repeat=7)) / n * 1e6


def main() -> None:
    log.configure("json", "warning")  # the connect/disconnect lines are not what is timed
    n = 50_000
    for processes in (1, 2, 3):
        for label, clients in (("one client", ["127.0.0.1"]),
                               ("10,000 clients", [f"10.{i >> 8}.{i & 255}.1"
                                                   for i in range(10_000)])):
            counts = SharedCounts.create(processes)
            us = per_connection(Connections(counts=counts), clients, n)
            print(f"{processes} process(es), {label}: {us:.2f} us per connection "
                  "(admit + release)")
            counts.close()


if __name__ == "__main__":
    main()
