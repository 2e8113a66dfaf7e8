"""Asks rspamd about a message: its HTTP protocol's `/checkv2`, over pooled connections.

rspamd reads the message as the request body and the SMTP envelope from request headers
(its protocol documentation: `IP`, `Helo`, `From`, `Rcpt` once per recipient, `Queue-Id`);
it answers with JSON whose `action` is what it recommends and `score` its verdict. The
client is aiohttp's: made for asyncio, it keeps a pool of keep-alive connections
(`connections` per process), so a message costs one request on an open connection, not a
connect and a thread. Every failure (refused, reset, slow past `timeout`, not JSON, no
action) is one `RspamdError`: the caller fails open or closed as configured.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from forwarder.config import RspamdSettings


class RspamdError(Exception):
    """rspamd gave no usable verdict; the text is short and fit for logs."""


@dataclass(frozen=True)
class Verdict:
    action: str  # "reject", "soft reject", "greylist", "add header", ...
    score: float
    required: float  # the score at which rspamd would reject


@dataclass(frozen=True)
class Envelope:
    client: str
    helo: str
    mailfrom: str  # "" for the null sender
    recipients: Sequence[str]
    queue_id: str


class RspamdClient:
    """One per process; `close()` it when the daemon stops."""

    def __init__(self, settings: RspamdSettings) -> None:
        self.url = settings.url.rstrip("/") + "/checkv2"
        self.timeout = aiohttp.ClientTimeout(total=settings.timeout)
        self._limit = settings.connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop that will use it.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._limit, keepalive_timeout=30.0)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout)
        return self._session

    async def check(self, message: bytes, envelope: Envelope) -> Verdict:
        headers = _request_headers(envelope)
        try:
            async with self._client().post(self.url, data=message, headers=headers) as reply:
                if reply.status != 200:
                    raise RspamdError(f"HTTP {reply.status}")
                body = await reply.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RspamdError(type(exc).__name__) from exc
        return parse_verdict(body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
            # aiohttp's advice: let the transports finish closing before the loop ends.
            await asyncio.sleep(0)


def _request_headers(envelope: Envelope) -> list[tuple[str, str]]:
    headers = [("IP", envelope.client), ("From", f"<{envelope.mailfrom}>"),
               ("Queue-Id", envelope.queue_id)]
    if envelope.helo:
        headers.append(("Helo", envelope.helo))
    headers.extend(("Rcpt", f"<{rcpt}>") for rcpt in envelope.recipients)
    return headers


def parse_verdict(body: bytes) -> Verdict:
    """The action and score of a /checkv2 answer, or RspamdError."""
    try:
        doc: Any = json.loads(body)
        action = doc["action"]
        score = float(doc.get("score", 0.0))
        required = float(doc.get("required_score", 0.0))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RspamdError("unreadable answer") from exc
    if not isinstance(action, str) or not action:
        raise RspamdError("answer without an action")
    return Verdict(action, score, required)


def spam_headers(verdict: Verdict, spam: bool) -> bytes:
    """X-Spam-Status and X-Spam-Score, prepended: the Subject and body are never rewritten
    (that would break the sender's DKIM signature)."""
    status = "Yes" if spam else "No"
    return (f"X-Spam-Status: {status}, score={verdict.score:.2f} "
            f"required={verdict.required:.2f}\r\n"
            f"X-Spam-Score: {verdict.score:.2f}\r\n").encode("ascii")
