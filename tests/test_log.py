"""The JSON log lines (forwarder/log.py): one object a line, RFC 3339 UTC timestamps."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from forwarder import log


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_the_timestamp_is_the_instant_in_rfc3339_utc(now: float) -> None:
    text = log.utc_timestamp(now)
    assert text.endswith("Z") and len(text) == len("2026-11-28T17:58:09.319553Z")
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert parsed.tzinfo == UTC
    assert abs(parsed.timestamp() - now) < 2e-6


def test_a_line_is_one_json_object_with_level_and_timestamp() -> None:
    out = io.StringIO()
    log.configure("json", "info", out)
    try:
        log.get("forwarder.test").info("queued", queue_id="Q1", to=["a@example.org"])
        log.get("forwarder.test").debug("hidden")
        log.flush()
    finally:
        log.configure("json", "warning")
    (line,) = out.getvalue().splitlines()
    doc = json.loads(line)
    assert doc["event"] == "queued" and doc["level"] == "info" and doc["to"] == ["a@example.org"]
    assert abs(datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00")).timestamp()
               - datetime.now(UTC).timestamp()) < 60
