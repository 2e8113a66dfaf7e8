"""A tiny /metrics HTTP endpoint, served from the daemon's own event loop (no thread), so
a scrape that times out is itself a sign of a stuck loop (docs/metrics.md)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST

from forwarder.metrics import Metrics

_REQUEST_TIMEOUT = 10.0
_MAX_HEADER_LINES = 100


@dataclass
class MetricsServer:
    """A running /metrics endpoint; `port` is the bound one (useful with port 0)."""

    server: asyncio.Server
    host: str
    port: int

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def start_metrics_server(metrics: Metrics, host: str, port: int) -> MetricsServer:
    """Serve GET /metrics over HTTP/1.0 from the running event loop (no extra thread).

    Bind it to loopback: there is no authentication. Returns once the socket is listening.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                status, body, content_type = await _respond(metrics, reader)
                head = (
                    f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode("ascii") + body)
                await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass  # a scraper that went away or sent garbage: nothing worth reporting
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port)
    bound_port: int = server.sockets[0].getsockname()[1]
    return MetricsServer(server, host, bound_port)


async def _respond(metrics: Metrics, reader: asyncio.StreamReader) -> tuple[str, bytes, str]:
    """Read one request; return (status line, body, content type)."""
    request_line = (await reader.readline()).decode("latin-1").split()
    # Headers are read and ignored so the client sees a clean close, not a reset.
    for _ in range(_MAX_HEADER_LINES):
        if (await reader.readline()).strip() == b"":
            break
    if len(request_line) < 2:
        return "400 Bad Request", b"bad request\n", "text/plain"
    method, target = request_line[0], request_line[1]
    if target.partition("?")[0] != "/metrics":
        return "404 Not Found", b"not found: try /metrics\n", "text/plain"
    if method != "GET":
        return "405 Method Not Allowed", b"method not allowed\n", "text/plain"
    return "200 OK", metrics.render(), CONTENT_TYPE_LATEST
