"""Prometheus metrics (the /metrics HTTP endpoint that serves them: metricsserver.py).

Callers report events (`rcpt_verdict`, `message_accepted`, `delivered`, ...) and never touch
prometheus objects, so the metric names and labels live in this file and in docs/metrics.md
only. Each `Metrics` owns its own CollectorRegistry rather than the process-global one, so
tests (and a daemon restarted in-process) can build as many as they like.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from forwarder import replies
from forwarder.policy import Outcome
from forwarder.replies import Reply

__all__ = [
    "AUTH_OUTCOMES",
    "DELIVERY_RESULTS",
    "DESTINATION_CLASSES",
    "LATENCY_BUCKETS",
    "QUEUE_STATES",
    "RATE_SCOPES",
    "REFUSAL_REASONS",
    "SPAM_ACTIONS",
    "TARGET_STATES",
    "TLS_RESULTS",
    "Metrics",
]

# Label values with a fixed set (policy.Outcome and policy.Route): a typo must not silently
# create a new time series, and pre-creating them makes rate() see the very first event.
DELIVERY_RESULTS = ("delivered", "deferred", "failed")
DESTINATION_CLASSES = ("mailbox", "redirect", "postmaster", "srs_return", "bounce", "notice",
                       "notice_bounce")
# Why a message was refused or deferred at or after DATA (forwarder_messages_refused_total).
REFUSAL_REASONS = ("size", "bare_lf", "nul", "line_too_long", "loop", "queue_error",
                   "no_space", "dmarc", "spam", "spam_deferred", "rate_limited",
                   "filter_unavailable", "auth_unavailable")
# The inbound checks (forwarder/checks.py): each method's RFC 8601 results, rspamd's actions
# ("unavailable": no verdict; "other": an action rspamd's configuration added), and which
# rate limit refused.
AUTH_OUTCOMES = {
    "spf": ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"),
    "dkim": ("pass", "fail", "neutral", "none", "temperror", "permerror"),
    "dmarc": ("pass", "fail", "none", "temperror", "permerror"),
}
SPAM_ACTIONS = ("no_action", "add_header", "rewrite_subject", "greylist", "soft_reject",
                "reject", "other", "unavailable")
RATE_SCOPES = ("client", "recipient")
# The session's own refusals after the final dot, by the reply it sent.
_BODY_REFUSALS = {
    replies.SIZE_EXCEEDED: "size",
    replies.BARE_LINE_END: "bare_lf",
    replies.NUL_IN_MESSAGE: "nul",
    replies.TEXT_LINE_TOO_LONG: "line_too_long",
    # A body written to its spool file as it arrived, and the write failed.
    replies.QUEUE_FULL: "no_space",
    replies.QUEUE_UNAVAILABLE: "queue_error",
}
# How each outbound SMTP session ended up with TLS (forwarder_outbound_tls_total).
TLS_RESULTS = ("verified", "encrypted", "clear", "handshake_failed", "policy_failed")
# forwarder_queue_depth: the queue's recipient rows (`queued`, leased ones included) and,
# among them, those being delivered right now (`in_flight`, the daemon's count).
QUEUE_STATES = ("queued", "in_flight")
# forwarder_targets: redirect targets by state (targets.TargetState).
TARGET_STATES = ("pending", "confirmed", "refused", "off", "failing")

# Acceptance-to-delivery: a relay hop takes tens of milliseconds, a greylisted destination
# minutes, a down one hours, and the queue lifetime is 5 days (then the message bounces).
LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 12 * 3600.0,
    86400.0, 2 * 86400.0, 3 * 86400.0, 5 * 86400.0,
)  # fmt: skip


class _ProcessCollector(ProcessCollector):
    """prometheus_client's process metrics (`process_resident_memory_bytes`, CPU, open
    files) of this process. The library reads the boot time from /proc/stat and reports
    nothing at all when it cannot, and the unit's ProcSubset=pid hides /proc/stat: the boot
    time then comes from CLOCK_BOOTTIME, which needs no file."""

    def _boot_time(self) -> float:
        try:
            found = super()._boot_time()  # type: ignore[no-untyped-call]
        except OSError:
            found = None
        if found:
            return float(found)
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def resident_memory_bytes() -> int:
    """This process's resident set size (0 where /proc/self/statm cannot be read)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGESIZE")
    except (OSError, ValueError, IndexError):
        return 0


# The counters: attribute, name, help, labels, and whether the acceptor processes count
# it (their running totals go to the main process: `Metrics.absorb`).
_COUNTERS: tuple[tuple[str, str, str, tuple[str, ...], bool], ...] = (
    ("_rcpt", "forwarder_rcpt_verdicts", "RCPT TO verdicts, by reason.", ("verdict",), True),
    ("_accepted", "forwarder_messages_accepted",
     "Messages committed to the queue (250 after DATA).", (), True),
    ("_refused", "forwarder_messages_refused",
     "Messages refused or deferred at or after DATA.", ("reason",), True),
    ("_bytes", "forwarder_accepted_bytes", "Size of accepted messages, in bytes.", (), True),
    ("_deliveries", "forwarder_deliveries",
     "Delivery attempts per recipient, by result and destination.",
     ("result", "destination"), False),
    ("_sessions_total", "forwarder_smtp_sessions", "SMTP sessions opened since start.", (),
     True),
    ("_outbound_tls", "forwarder_outbound_tls", "Outbound SMTP sessions, by how TLS went.",
     ("tls",), False),
    ("_converted", "forwarder_mime_conversions",
     "Messages converted to 7-bit for a next hop without 8BITMIME.", (), False),
    ("_suspended", "forwarder_destination_suspensions",
     "Destinations declared dead after timeouts or refused connections.", (), False),
    ("_auth", "forwarder_auth_results", "SPF, DKIM and DMARC results of checked messages.",
     ("method", "outcome"), True),
    ("_spam", "forwarder_spam_checks", "rspamd verdicts, by action.", ("action",), True),
    ("_rate", "forwarder_rate_limited", "Messages deferred by a rate limit.", ("scope",), True),
    ("_test_deliveries", "forwarder_test_deliveries",
     "Delivery attempts of `forwarder send-test` messages, by result (not counted in"
     " forwarder_deliveries_total).", ("result",), False),
    ("_history_errors", "forwarder_history_write_errors",
     "Delivery history rows that could not be written (the mail went on).", (), True),
)


def _summary(registry: CollectorRegistry) -> dict[str, Any]:
    """The figures `forwarder status` shows, read back from `registry` (so they
    include what the acceptors reported): running totals, the queue as last counted,
    open sessions and resident memory."""
    values: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in registry.collect():
        for sample in family.samples:
            values.setdefault(sample.name, []).append((sample.labels, sample.value))

    def total(name: str, **match: str) -> float:
        return sum(v for labels, v in values.get(name, [])
                   if all(labels.get(k) == want for k, want in match.items()))

    return {
        "accepted": total("forwarder_messages_accepted_total"),
        "refused": total("forwarder_messages_refused_total"),
        "deliveries": {result: total("forwarder_deliveries_total", result=result)
                       for result in DELIVERY_RESULTS},
        "queue_depth": {labels["state"]: value for labels, value
                        in values.get("forwarder_queue_depth", [])},
        "queue_oldest_age_seconds": total("forwarder_queue_oldest_age_seconds"),
        "smtp_sessions_open": total("forwarder_smtp_sessions_open"),
        "resident_memory_bytes": total("process_resident_memory_bytes")
        + total("forwarder_acceptors_resident_memory_bytes"),
    }


class Metrics:
    """Every metric the daemon exports, behind one method per event."""

    # Set by _build_counters from _COUNTERS.
    _rcpt: Counter
    _accepted: Counter
    _refused: Counter
    _bytes: Counter
    _deliveries: Counter
    _sessions_total: Counter
    _outbound_tls: Counter
    _converted: Counter
    _suspended: Counter
    _auth: Counter
    _spam: Counter
    _rate: Counter
    _test_deliveries: Counter
    _history_errors: Counter

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        verdicts: Iterable[str] = (),
        queue_states: Iterable[str] = QUEUE_STATES,
    ) -> None:
        """`verdicts`, `queue_states`: label values to export at 0 from the start (the
        verdicts are the policy's reasons, not listed in this file)."""
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        _ProcessCollector(registry=self.registry)
        self._build_counters()
        self._build_gauges()
        self._queue_states: set[str] = set()
        self._preinit(verdicts, queue_states)

    def _build_counters(self) -> None:
        for attr, name, documentation, labels, _front in _COUNTERS:
            setattr(self, attr, Counter(name, documentation, labels, registry=self.registry))

    def _build_gauges(self) -> None:
        reg = self.registry
        self._queue_depth = Gauge(
            "forwarder_queue_depth", "Queued recipients, by state.", ["state"], registry=reg
        )
        self._targets = Gauge(
            "forwarder_targets", "Redirect targets in the directory, by state.", ["state"],
            registry=reg,
        )
        self._oldest = Gauge(
            "forwarder_queue_oldest_age_seconds",
            "Age of the oldest message still queued (0 when the queue is empty).",
            registry=reg,
        )
        self._latency = Histogram(
            "forwarder_delivery_latency_seconds",
            "Time from acceptance to successful delivery, per recipient.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._open_sessions = Gauge(
            "forwarder_smtp_sessions_open", "SMTP sessions currently open.", registry=reg
        )
        self._dead = Gauge(
            "forwarder_destinations_suspended",
            "Destinations whose delivery is suspended now (dead destinations).", registry=reg)
        self._own_open = 0
        # Several nodes: seconds since the node's copy of the PostgreSQL directory was
        # last synchronised (forwarder/directory/cluster.py); 0 on the embedded directory.
        self._staleness: Callable[[], float] = lambda: 0.0
        Gauge("forwarder_directory_staleness_seconds",
              "Seconds since this node's copy of the PostgreSQL directory was last "
              "synchronised (0 with the embedded SQLite directory).",
              registry=reg).set_function(lambda: self._staleness())
        self._child_open: dict[str, int] = {}
        self._child_rss: dict[str, int] = {}
        self._absorbed: dict[str, dict[str, float]] = {}
        self._open_sessions.set_function(
            lambda: self._own_open + sum(self._child_open.values()))
        # The main process's own memory is process_resident_memory_bytes (above); the
        # acceptor processes report theirs with their counters, once a second.
        Gauge("forwarder_acceptors_resident_memory_bytes",
              "Resident memory of the acceptor processes, summed (0 without acceptors).",
              registry=reg).set_function(lambda: sum(self._child_rss.values()))
        self._front_counters: dict[str, Counter] = {
            f"{name}_total": getattr(self, attr)
            for attr, name, _doc, _labels, front in _COUNTERS if front}

    def _preinit(self, verdicts: Iterable[str], states: Iterable[str]) -> None:
        for result in DELIVERY_RESULTS:
            for destination in DESTINATION_CLASSES:
                self._deliveries.labels(result=result, destination=destination)
        for result in DELIVERY_RESULTS:
            self._test_deliveries.labels(result=result)
        for verdict in verdicts:
            self._rcpt.labels(verdict=verdict)
        for reason in REFUSAL_REASONS:
            self._refused.labels(reason=reason)
        for result in TLS_RESULTS:
            self._outbound_tls.labels(tls=result)
        for method, outcomes in AUTH_OUTCOMES.items():
            for outcome in outcomes:
                self._auth.labels(method=method, outcome=outcome)
        for action in SPAM_ACTIONS:
            self._spam.labels(action=action)
        for scope in RATE_SCOPES:
            self._rate.labels(scope=scope)
        self.queue_snapshot(dict.fromkeys(states, 0), None)
        self.targets_snapshot({})

    # --- SMTP front -------------------------------------------------------------------

    def session_opened(self) -> None:
        self._sessions_total.inc()
        self._own_open += 1

    def session_closed(self) -> None:
        self._own_open -= 1

    # --- several accepting processes ------------------------------------------------------
    # Each acceptor process counts its own SMTP-side events; the main process, which serves
    # /metrics, absorbs their running totals so one scrape sees the whole daemon.

    def front_totals(self) -> dict[str, float]:
        """This process's SMTP-side counters, as running totals keyed by sample."""
        totals: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name in self._front_counters:
                    key = json.dumps([sample.name, sorted(sample.labels.items())])
                    totals[key] = sample.value
        return totals

    @property
    def open_sessions(self) -> int:
        """SMTP sessions open in this process."""
        return self._own_open

    @property
    def all_open_sessions(self) -> int:
        """SMTP sessions open in this process and in the acceptors that report to it."""
        return self._own_open + sum(self._child_open.values())

    def absorb(self, source: str, totals: Mapping[str, float], open_sessions: int,
               rss: int | None = None) -> None:
        """Add what `source` (an acceptor) counted since its last report; `rss` is its
        resident memory now."""
        if rss is not None:
            self._child_rss[source] = rss
        seen = self._absorbed.setdefault(source, {})
        for key, value in totals.items():
            delta = value - seen.get(key, 0.0)
            if delta <= 0:
                continue
            seen[key] = value
            name, labels = json.loads(key)
            counter = self._front_counters[name]
            (counter.labels(**dict(labels)) if labels else counter).inc(delta)
        self._child_open[source] = open_sessions

    def forget(self, source: str) -> None:
        """An acceptor exited: its sessions are gone (its counts stay in the totals)."""
        self._child_open.pop(source, None)
        self._child_rss.pop(source, None)
        self._absorbed.pop(source, None)

    def rcpt_verdict(self, verdict: str) -> None:
        """One RCPT TO decided; `verdict` is the policy's reason (`forward`, `unknown`...)."""
        self._rcpt.labels(verdict=verdict).inc()

    def message_accepted(self, size_bytes: int) -> None:
        self._accepted.inc()
        self._bytes.inc(size_bytes)

    def message_refused(self, reason: str) -> None:
        """A message refused or deferred at or after DATA; `reason` is in REFUSAL_REASONS."""
        if reason not in REFUSAL_REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}")
        self._refused.labels(reason=reason).inc()

    def body_refused(self, reply: Reply) -> None:
        """The session refused a message after its final dot with `reply` (too big, bare
        CR or LF, NUL, a text line too long, its spool file unwritable)."""
        reason = _BODY_REFUSALS.get(reply)
        if reason is None:
            raise ValueError(f"no refusal reason for {reply}")
        self.message_refused(reason)

    # --- inbound checks ---------------------------------------------------------------

    def auth_result(self, method: str, outcome: str) -> None:
        """One SPF, DKIM (one per signature) or DMARC result; a result the library names
        otherwise counts as permerror (the set stays fixed)."""
        known = AUTH_OUTCOMES[method]
        self._auth.labels(method=method, outcome=outcome if outcome in known
                          else "permerror").inc()

    def spam_checked(self, action: str) -> None:
        """rspamd's verdict on a message (an action in SPAM_ACTIONS)."""
        if action not in SPAM_ACTIONS:
            raise ValueError(f"unknown spam action {action!r}")
        self._spam.labels(action=action).inc()

    def rate_limited(self, scope: str) -> None:
        if scope not in RATE_SCOPES:
            raise ValueError(f"unknown rate-limit scope {scope!r}")
        self._rate.labels(scope=scope).inc()

    # --- delivery ---------------------------------------------------------------------

    def delivered(self, destination: str, latency_seconds: float) -> None:
        """A recipient's copy accepted downstream, `latency_seconds` after we accepted it."""
        self._delivery("delivered", destination)
        self._latency.observe(max(0.0, latency_seconds))

    def deferred(self, destination: str) -> None:
        """A temporary failure: the recipient stays queued for a later retry."""
        self._delivery("deferred", destination)

    def failed(self, destination: str) -> None:
        """A permanent failure (or the queue lifetime expired): the recipient is bounced."""
        self._delivery("failed", destination)

    def delivery_result(
        self, result: Outcome, destination: str, latency_seconds: float | None = None
    ) -> None:
        """The same as delivered/deferred/failed, for callers holding a policy.Outcome."""
        if result is Outcome.DELIVERED:
            self.delivered(destination, latency_seconds if latency_seconds is not None else 0.0)
        else:
            self._delivery(result.value, destination)

    def test_delivery(self, result: Outcome) -> None:
        """An attempt at a `forwarder send-test` message: counted apart, so a test to a
        broken target does not look like mail failing."""
        self._test_deliveries.labels(result=result.value).inc()

    def history_write_failed(self) -> None:
        self._history_errors.inc()

    def _delivery(self, result: str, destination: str) -> None:
        if result not in DELIVERY_RESULTS:
            raise ValueError(f"unknown delivery result {result!r}")
        if destination not in DESTINATION_CLASSES:
            raise ValueError(f"unknown destination class {destination!r}")
        self._deliveries.labels(result=result, destination=destination).inc()

    def outbound_tls(self, result: str) -> None:
        """An outbound SMTP session opened (or failed to) with this TLS `result`."""
        if result not in TLS_RESULTS:
            raise ValueError(f"unknown TLS result {result!r}")
        self._outbound_tls.labels(tls=result).inc()

    def converted_7bit(self) -> None:
        self._converted.inc()

    def destination_suspended(self, suspended_now: int) -> None:
        self._suspended.inc()
        self._dead.set(suspended_now)

    def count_suspended(self, count: Callable[[], int]) -> None:
        """Read the number of suspended destinations at each scrape (delivery's slots)."""
        self._dead.set_function(count)

    # --- queue ------------------------------------------------------------------------

    def directory_staleness(self, seconds: Callable[[], float]) -> None:
        self._staleness = seconds

    def queue_snapshot(self, depth_by_state: Mapping[str, int], oldest_age: float | None) -> None:
        """The queue as last counted: recipients per state and the oldest message's age.

        A state seen before but missing now is set to 0 rather than left at its old value.
        `oldest_age` None means the queue is empty.
        """
        self._queue_states.update(depth_by_state)
        for state in self._queue_states:
            self._queue_depth.labels(state=state).set(depth_by_state.get(state, 0))
        self._oldest.set(max(0.0, oldest_age) if oldest_age is not None else 0.0)

    # --- directory ------------------------------------------------------------------------

    def targets_snapshot(self, by_state: Mapping[str, int]) -> None:
        """The redirect targets as last counted, per state (a state with none reads 0)."""
        for state in TARGET_STATES:
            self._targets.labels(state=state).set(by_state.get(state, 0))

    def summary(self) -> dict[str, Any]:
        """The figures `forwarder status` shows (module function `_summary`)."""
        return _summary(self.registry)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
