"""Settings: built-in defaults, then a TOML file, then command-line flags.

The result is a frozen dataclass passed explicitly to every component (DESIGN.md habit 7):
nothing reads configuration from a global.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_hostport(text: str, default_port: int = 25) -> HostPort:
    """Parse `host`, `host:port` or `[v6]:port`; raise ValueError on anything else."""
    text = text.strip()
    if not text:
        raise ValueError("empty host")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad host:port {text!r}")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"bad host in {text!r}")
    port = int(port_text) if port_text else default_port
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return HostPort(host, port)


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
    # --- issue 7 (forwarder/smtp.py) ---
    # Deadline for the whole DATA body, from the 354 to the final dot (10 minutes: the
    # RFC 5321 4.5.3.2.6 data termination timeout; 25 MiB at 43 kB/s).
    data_timeout: float = 600.0
    # RFC 5321 4.5.3.1.4 and 4.5.3.1.6: both lengths include the CRLF.
    max_command_line: int = 512
    max_line_length: int = 1000
    # --- end issue 7 ---


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
    config_file: Path | None = None
    # Inbound STARTTLS (RFC 3207) is offered when both are set (issue 7, forwarder/smtp.py).
    tls_cert: Path | None = None
    tls_key: Path | None = None

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
    def effective_srs_domain(self) -> str:
        return self.srs_domain or self.domains[0]


_HOSTPORT_KEYS = {"listen": 2525, "smarthost": 25, "mailbox_host": 25, "metrics_listen": 9325}
_TOP_KEYS = {f.name for f in dataclasses.fields(Settings)} - {"config_file"}
_SECTIONS: dict[str, type[Any]] = {"limits": Limits, "delivery": DeliverySettings}


def _convert_top(key: str, value: Any, problems: list[str]) -> Any:
    if key in _HOSTPORT_KEYS:
        if value in ("", None):
            return None
        try:
            return parse_hostport(str(value), _HOSTPORT_KEYS[key])
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
            return None
    if key == "dns_servers":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append("dns_servers: must be a list of \"host\" or \"host:port\"")
            return ()
        try:
            return tuple(parse_hostport(v, 53) for v in value)
        except ValueError as exc:
            problems.append(f"dns_servers: {exc}")
            return ()
    if key == "domains":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(d, str) for d in value):
            problems.append("domains: must be a non-empty list of domain names")
            return None
        return tuple(d.strip().lower().rstrip(".") for d in value)
    if key == "state_dir":
        return Path(str(value))
    if key in ("tls_cert", "tls_key"):  # issue 7: inbound STARTTLS
        return Path(str(value)) if value else None
    if key == "listen_backlog":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            problems.append("listen_backlog: must be a whole number from 1 to 65535")
            return 1024
        return value
    if key == "acceptors":
        if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= 64:
            problems.append("acceptors: must be a whole number from -1 (auto) to 64")
            return -1
        return value
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


def _convert_section(name: str, raw: Any, problems: list[str]) -> Any:
    cls = _SECTIONS[name]
    if not isinstance(raw, dict):
        problems.append(f"[{name}]: must be a table")
        return cls()
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            problems.append(f"[{name}] unknown key {key!r}")
            continue
        default = getattr(cls(), key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            problems.append(f"[{name}] {key}: must be a number >= 0")
            continue
        values[key] = type(default)(value)
    return cls(**values)


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
