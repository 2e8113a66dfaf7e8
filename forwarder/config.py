"""Settings: built-in defaults, then a TOML file, then command-line flags.

The result is a frozen dataclass passed explicitly to every component (DESIGN.md habit 7):
nothing reads configuration from a global.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Re-exported: `host[:port]` values are parsed there, and named from here by everything else.
from forwarder.hostport import HostPort as HostPort
from forwarder.hostport import parse_hostport as parse_hostport

DEFAULT_DOMAIN = "sigma-clermont.fr"
DEFAULT_LISTEN = "127.0.0.1:2525"
DEFAULT_STATE_DIR = "./forwarder-data"
ENV_CONFIG = "FORWARDER_CONFIG"


class ConfigError(Exception):
    """One or more problems in the configuration; `problems` lists every one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Limits:
    # PRODUCT.md "Limits": 25 MiB, 100 recipients, RFC 5321 4.5.3.1 line lengths.
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_connections: int = 500
    max_connections_per_client: int = 20
    # RFC 5321 4.5.3.2.7: the server should wait at least 5 minutes for the next command.
    # A deadline for the whole command line, not an idle timer reset by each byte (slowloris).
    command_timeout: float = 300.0
    max_received_headers: int = 50
    # Deadline for the whole DATA body, from the 354 to the final dot (10 minutes: the
    # RFC 5321 4.5.3.2.6 data termination timeout; 25 MiB at 43 kB/s).
    data_timeout: float = 600.0
    # RFC 5321 4.5.3.1.4 and 4.5.3.1.6: both lengths include the CRLF.
    max_command_line: int = 512
    max_line_length: int = 1000
    # Postfix's smtpd_junk_command_limit and smtpd_hard_error_limit; the tarpit's step (the
    # 11th error's reply waits this long, each later one a step more: policy.tarpit_delay).
    max_junk_commands: int = 100
    max_errors: int = 20
    error_sleep: float = 1.0
    # A whole session, however busy: then `421 4.4.2` between two transactions.
    session_timeout: float = 1800.0
    # A body past this many octets goes to a spool file as it arrives (queue/spool.py).
    spill_threshold: int = 256 * 1024
    # Space kept back for the writes that settle mail on a full disk (queue/reserve.py).
    disk_reserve: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class DeliverySettings:
    # Postfix's defaults: minimal_backoff_time 300 s, maximal_backoff_time 4000 s,
    # maximal_queue_lifetime 5 days.
    first_retry: float = 300.0
    max_retry: float = 4000.0
    queue_lifetime: float = 5 * 86400.0
    delay_warning: float = 0.0  # 0 = off
    concurrency: int = 20
    per_destination: int = 10
    # RFC 5321 4.5.3.2: connect/greeting 5 min is the ceiling; 30 s is what MTAs use.
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    # RFC 5321 4.5.3.2.6: a short wait after the final dot duplicates mail.
    data_timeout: float = 600.0
    idle_connection_time: float = 30.0
    poll_interval: float = 1.0
    # The port MX hosts are contacted on (25; tests point it at their sinks).
    mx_port: int = 25
    # Head-of-line blocking (docs/performance.md): an MX destination (a recipient domain)
    # gets at most this share of `concurrency` (and at most `per_destination`), so slow
    # destinations cannot take every slot; the mailbox host and the smarthost have
    # `per_destination` slots of their own, outside `concurrency`.
    destination_share: float = 0.25
    # A destination whose connections keep timing out or failing is throttled (its slots
    # halved per failure) and, at one slot, suspended this long: its mail is deferred at
    # once, without connecting (Postfix's "dead destination").
    dead_destination_time: float = 300.0
    # MTA-STS (RFC 8461): the port policy hosts are fetched from (443; tests change it),
    # and how long a fetch may take.
    mta_sts_port: int = 443
    mta_sts_timeout: float = 30.0


@dataclass(frozen=True)
class TargetSettings:
    """Redirect targets (forwarder/targets.py, docs/admin.md "Redirect targets")."""

    # The dead-target rule: this many mailbox failures (5.1.x, 5.2.1) spanning at least
    # this many days, with no success in between, make a target `failing` (PRODUCT.md).
    max_failures: int = 5
    failure_days: float = 30.0
    # How long a notice's confirm+ and refuse+ addresses stay valid.
    token_days: float = 30.0
    # Seconds between two notices of one import, so that a term's thousands of new
    # targets are not mailed in one burst (a provider's rate limits, our reputation);
    # a target declared on its own gets its notice at once.
    notice_interval: float = 1.0


@dataclass(frozen=True)
class CheckSettings:
    """SPF, DKIM and DMARC before the 250 (docs/admin.md, "Inbound checks")."""

    enabled: bool = False
    # What a DMARC failure under the From domain's p=reject gets: "reject" (550 5.7.1),
    # "mark" (forwarded, dmarc=fail in the header) or "off" (DMARC not evaluated).
    dmarc_reject: str = "reject"
    # When the checks cannot conclude because DNS failed (temperror): forward (true) or
    # answer 451 4.7.0 (false). Never a 5xx either way.
    fail_open: bool = True
    # The authserv-id of our Authentication-Results (RFC 8601 2.5); empty: `hostname`.
    authserv_id: str = ""
    # The whole check, DNS included, per message (RFC 7208 4.6.4 suggests at least 20 s
    # for SPF alone; the client waits up to 10 minutes after the dot, RFC 5321 4.5.3.2.6).
    deadline: float = 20.0
    # Worker threads for the synchronous libraries (pyspf, dkimpy): bounded, as each may
    # wait on DNS.
    threads: int = 8
    # How often the per-sender-domain counts go to the directory (one transaction).
    report_interval: float = 60.0


@dataclass(frozen=True)
class RspamdSettings:
    """rspamd as the spam gate; `url` empty: no spam filter."""

    url: str = ""
    timeout: float = 10.0
    # rspamd unreachable, slow or answering nonsense: forward (true, logged and counted)
    # or answer 451 4.7.0 (false).
    fail_open: bool = True
    # Pooled HTTP connections to rspamd (per process).
    connections: int = 16


@dataclass(frozen=True)
class RateLimits:
    """Token buckets in memory, per process (docs/admin.md says how they add up)."""

    # Messages a minute from one client address (the bucket holds this many); 0: off.
    client_per_minute: int = 300
    # Messages an hour to one of our addresses; 0: off.
    recipient_per_hour: int = 100
    # Clients the per-client limit does not apply to (the school's own relay, loopback).
    exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class HistorySettings:
    # The delivery history per address (forwarder/history/): how long it is kept, in days
    # (0: nothing is recorded, and what was is purged); subjects only if the admin says so.
    retention_days: float = 30.0
    subjects: bool = False


@dataclass(frozen=True)
class Settings:
    listen: HostPort = field(default_factory=lambda: parse_hostport(DEFAULT_LISTEN))
    # Connections the kernel completes and holds for us until accept() (listen(2)); a
    # burst past it loses SYNs, and each costs its client a 1 s retransmission. Postfix
    # asks for 100; the kernel caps it at net.core.somaxconn (4096 on Linux >= 5.4).
    listen_backlog: int = 1024
    domains: tuple[str, ...] = (DEFAULT_DOMAIN,)
    hostname: str = field(default_factory=socket.getfqdn)
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    smarthost: HostPort | None = None
    mailbox_host: HostPort | None = None
    postmaster: str | None = None
    srs_domain: str | None = None
    busy_timeout: float = 2.0
    log_format: str = "json"
    log_level: str = "info"
    metrics_listen: HostPort | None = None
    # Nameservers for MX lookups and redirect checks ("host" or "host:port", one port for
    # all); empty: the system's /etc/resolv.conf.
    dns_servers: tuple[HostPort, ...] = ()
    # SIGTERM: how long sessions in flight may take to finish their transaction.
    stop_timeout: float = 30.0
    # Extra processes accepting SMTP on the same socket (forwarder/workers.py); -1: one
    # per CPU beyond the first, 0: everything in one process.
    acceptors: int = -1
    limits: Limits = field(default_factory=Limits)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    targets: TargetSettings = field(default_factory=TargetSettings)
    # From: and envelope sender of the notices to redirect targets; None: postmaster@ the
    # first domain (whose mail reaches `postmaster`, the admin address).
    notice_sender: str | None = None
    checks: CheckSettings = field(default_factory=CheckSettings)
    rspamd: RspamdSettings = field(default_factory=RspamdSettings)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    history: HistorySettings = field(default_factory=HistorySettings)
    config_file: Path | None = None
    # Client networks whose errors are not counted across sessions (forwarder/tarpit.py):
    # the school's own relay, which passes on its senders' mistakes.
    error_limit_exempt: tuple[str, ...] = ()
    # Inbound STARTTLS (RFC 3207) is offered when both are set (forwarder/session.py).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Outbound: the name we give in EHLO (default: hostname) and the source addresses mail
    # leaves from, IPv4 and IPv6 (SPF records must name them); unset: the kernel chooses.
    helo_name: str | None = None
    source_address: str | None = None
    source_address6: str | None = None
    # Certificates checked where a policy demands it (MTA-STS `enforce`, and the HTTPS
    # fetch of the policies themselves) are verified against this CA bundle; unset: the
    # system's. `mta_sts = false` ignores published policies (opportunistic TLS only).
    tls_ca_file: Path | None = None
    mta_sts: bool = True
    # Several nodes (docs/cluster.md, admin.md section 13): the directory in PostgreSQL.
    directory_url: str = ""
    directory_password: str = ""
    directory_max_staleness: float = 900.0
    directory_sweep: float = 30.0
    directory_log_retention: float = 30 * 86400.0  # the change log's, pruned hourly
    # Gateways allowed Postfix's XFORWARD (admin.md section 3); empty: nobody (audit trails).
    xforward_hosts: tuple[str, ...] = ()

    @property
    def directory_path(self) -> Path:
        return self.state_dir / "directory.sqlite3"

    @property
    def queue_path(self) -> Path:
        return self.state_dir / "queue.sqlite3"

    @property
    def acceptor_count(self) -> int:
        if self.acceptors >= 0:
            return self.acceptors
        return max(0, (os.cpu_count() or 1) - 1)

    @property
    def ehlo_name(self) -> str:
        return self.helo_name or self.hostname

    @property
    def effective_srs_domain(self) -> str:
        return self.srs_domain or self.domains[0]

    @property
    def effective_notice_sender(self) -> str:
        return self.notice_sender or f"postmaster@{self.domains[0]}"

    @property
    def authserv_id(self) -> str:
        return self.checks.authserv_id or self.hostname


_HOSTPORT_KEYS = {"listen": 2525, "smarthost": 25, "mailbox_host": 25, "metrics_listen": 9325}
_TOP_KEYS = {f.name for f in dataclasses.fields(Settings)} - {"config_file"}
_SECTIONS: dict[str, type[Any]] = {"limits": Limits, "delivery": DeliverySettings,
                                   "targets": TargetSettings, "checks": CheckSettings,
                                   "rspamd": RspamdSettings, "rate_limits": RateLimits,
                                   "history": HistorySettings}
DMARC_REJECT_MODES = ("reject", "mark", "off")
_TOKEN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")


def _convert_top(key: str, value: Any, problems: list[str]) -> Any:
    if key in _HOSTPORT_KEYS:
        if value in ("", None):
            return None
        try:
            return parse_hostport(str(value), _HOSTPORT_KEYS[key])
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
            return None
    if key in _LIST_KEYS:
        return _convert_list(key, [value] if isinstance(value, str) else value, problems)
    if key == "state_dir":
        return Path(str(value))
    if key in _WHOLE_NUMBERS:
        low, high, default, says = _WHOLE_NUMBERS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            problems.append(f"{key}: must be a whole number {says}")
            return default
        return value
    if key in _OUTBOUND_KEYS:
        return _convert_outbound(key, value, problems)
    if key.startswith("directory_") and key != "directory_password" and value != "":
        return _convert_cluster(key, value, problems)
    if key in ("busy_timeout", "stop_timeout"):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            problems.append(f"{key}: must be a number of seconds >= 0")
            return None
        return float(value)
    if key == "log_format" and value not in ("json", "console"):
        problems.append("log_format: must be 'json' or 'console'")
    if key == "log_level" and str(value).lower() not in ("debug", "info", "warning", "error"):
        problems.append("log_level: must be debug, info, warning or error")
    if not isinstance(value, str):
        problems.append(f"{key}: must be a string")
    return value


def _convert_cluster(key: str, value: Any, problems: list[str]) -> Any:
    if key == "directory_url" and not str(value).startswith(("postgresql://", "postgres://")):
        problems.append(f"{key}: must be empty (SQLite) or a postgresql:// URL")
    elif key != "directory_url" and not (type(value) in (int, float) and value > 0):
        problems.append(f"{key}: must be a number of seconds > 0")
    else:
        return value if key == "directory_url" else float(value)
    return value


# key -> (lowest, highest, default when wrong, what the problem says)
_WHOLE_NUMBERS = {"listen_backlog": (1, 65535, 1024, "from 1 to 65535"),
                  "acceptors": (-1, 64, -1, "from -1 (auto) to 64")}
_LIST_KEYS = ("dns_servers", "domains", "error_limit_exempt", "xforward_hosts")


def _convert_list(key: str, value: Any, problems: list[str]) -> Any:
    """The keys that take a list of strings (one string is a list of one)."""
    if key == "dns_servers":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append("dns_servers: must be a list of \"host\" or \"host:port\"")
            return ()
        try:
            return tuple(parse_hostport(v, 53) for v in value)
        except ValueError as exc:
            problems.append(f"dns_servers: {exc}")
            return ()
    if key == "domains":
        if not isinstance(value, list) or not value or not all(isinstance(d, str) for d in value):
            problems.append("domains: must be a non-empty list of domain names")
            return None
        return tuple(d.strip().lower().rstrip(".") for d in value)
    return _networks(key, value, problems)


def _networks(key: str, value: Any, problems: list[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{key}: must be a list of addresses or networks")
        return ()
    problem = _network_problem(value)
    if problem is not None:
        problems.append(f"{key}: {problem}")
        return ()
    return tuple(value)


def _network_problem(values: list[str] | tuple[str, ...]) -> str | None:
    """What is wrong with a list of addresses or networks (the first bad one), or None."""
    for network in values:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            return f"{network!r} is not an address or network (e.g. 10.0.0.25/32)"
    return None


_OUTBOUND_KEYS = ("tls_cert", "tls_key", "tls_ca_file", "source_address", "source_address6",
                  "mta_sts")


def _convert_outbound(key: str, value: Any, problems: list[str]) -> Any:
    """TLS files, source addresses and the MTA-STS switch."""
    if key in ("tls_cert", "tls_key", "tls_ca_file"):
        return Path(str(value)) if value else None
    if key in ("source_address", "source_address6"):
        return _source_address(key, value, problems)
    if not isinstance(value, bool):
        problems.append(f"{key}: must be true or false")
        return True
    return value


def _source_address(key: str, value: Any, problems: list[str]) -> str | None:
    """An outbound source address: an IPv4 address for `source_address`, IPv6 for
    `source_address6`."""
    if value in ("", None):
        return None
    want = ipaddress.IPv4Address if key == "source_address" else ipaddress.IPv6Address
    try:
        return str(want(str(value)))
    except ValueError:
        problems.append(f"{key}: not an IPv{4 if key == 'source_address' else 6} address")
        return None


def _convert_section(name: str, raw: Any, problems: list[str]) -> Any:
    cls = _SECTIONS[name]
    if not isinstance(raw, dict):
        problems.append(f"[{name}]: must be a table")
        return cls()
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            problems.append(f"[{name}] unknown key {key!r}")
            continue
        converted = _convert_value(getattr(cls(), key), value)
        problem = converted if isinstance(converted, _Problem) else _check(name, key, converted)
        if problem is not None:
            problems.append(f"[{name}] {key}: {problem}")
            continue
        values[key] = converted
    return cls(**values)


class _Problem(str):
    """A conversion that failed, saying why."""


def _convert_value(default: Any, value: Any) -> Any:
    """`value` as the type of `default` (the field's), or a _Problem."""
    if isinstance(default, bool):
        return value if isinstance(value, bool) else _Problem("must be true or false")
    if isinstance(default, int | float):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            return _Problem("must be a number >= 0")
        return type(default)(value)
    if isinstance(default, str):
        return value if isinstance(value, str) else _Problem("must be a string")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return _Problem("must be a list of strings")
    return tuple(value)


def _check(section: str, key: str, value: Any) -> str | None:
    """What is wrong with a well-typed value, for the keys that take only some values."""
    if (section, key) == ("checks", "dmarc_reject") and value not in DMARC_REJECT_MODES:
        return f"must be one of {', '.join(DMARC_REJECT_MODES)}"
    if (section, key) in (("checks", "threads"), ("rspamd", "connections")) and value < 1:
        return "must be at least 1"
    if key in ("deadline", "timeout", "report_interval") and value <= 0:
        return "must be a number of seconds > 0"
    if (section, key) == ("targets", "max_failures") and value < 1:
        return "must be at least 1"
    if (section, key) == ("targets", "token_days") and value <= 0:
        return "must be a number of days > 0"
    if (section, key) == ("checks", "authserv_id") and value and not _TOKEN.match(value):
        return "must be a host or domain name (it names us in Authentication-Results)"
    if (section, key) == ("rspamd", "url") and value:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return "must be an http:// or https:// URL, e.g. http://127.0.0.1:11333"
    if (section, key) == ("rate_limits", "exempt"):
        return _network_problem(value)
    return None


def settings_from_mapping(data: Mapping[str, Any], base: Settings | None = None) -> Settings:
    """Apply a parsed TOML document on top of `base`; collect every problem, then raise."""
    problems: list[str] = []
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            changes[key] = _convert_section(key, value, problems)
        elif key in _TOP_KEYS:
            changes[key] = _convert_top(key, value, problems)
        else:
            problems.append(f"unknown key {key!r}")
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(base or Settings(), **changes)


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults, then the TOML file (`--config`, else $FORWARDER_CONFIG), then flag overrides."""
    env = os.environ if environ is None else environ
    path = config_file or env.get(ENV_CONFIG) or None
    settings = Settings()
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError([f"cannot read config file {path}: {exc.strerror}"]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"config file {path}: {exc}"]) from exc
        settings = settings_from_mapping(data, settings)
        settings = dataclasses.replace(settings, config_file=Path(path))
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    if flags:
        settings = settings_from_mapping(flags, settings)
    return settings
