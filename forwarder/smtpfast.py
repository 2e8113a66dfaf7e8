"""A cheaper set-up for aiosmtpd's SMTP protocol object, made once per connection.

Measured under the compare.sh load (one connection per message), stock aiosmtpd spends
about a fifth of the daemon's CPU in `SMTP.__init__`, which rebuilds its tables of hooks,
commands and AUTH mechanisms with `inspect.getmembers` and `dir()` for every connection
(151 us; docs/performance.md). The tables only depend on the protocol class and the
handler's class, so they are computed once and bound per connection (15 us).

The set-up mirrors aiosmtpd 1.4's `SMTP.__init__` for the options the daemon uses (no
AUTH, no PROXY protocol, no call limits); `FAST_INIT` is false for any other aiosmtpd
version, and the caller then uses the stock constructor.
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
from typing import Any

import aiosmtpd
from aiosmtpd import smtp as _smtp

FAST_INIT = aiosmtpd.__version__.startswith("1.4.")

_Tables = tuple[tuple[tuple[str, str], ...], str | None, tuple[tuple[str, str], ...]]
_TABLES: dict[tuple[type[Any], type[Any]], _Tables] = {}


def _tables(cls: type[Any], handler: Any) -> _Tables:
    key = (cls, type(handler))
    found = _TABLES.get(key)
    if found is None:
        hooks = tuple((name.replace("handle_", ""), name) for name in dir(handler)
                      if name.startswith("handle_"))
        ehlo = getattr(handler, "handle_EHLO", None)
        ehlo_ver = None
        if ehlo is not None:
            ehlo_ver = {4: "old", 5: "new"}[len(inspect.signature(ehlo).parameters)]
        commands = tuple((name.replace("smtp_", ""), name) for name in dir(cls)
                         if name.startswith("smtp_"))
        found = _TABLES[key] = (hooks, ehlo_ver, commands)
    return found


def fast_init(
    proto: Any, handler: Any, *, hostname: str, ident: str, data_size_limit: int | None,
    timeout: float, tls_context: ssl.SSLContext | None,
) -> None:
    """What aiosmtpd 1.4's SMTP.__init__ does for our options, with cached tables."""
    proto.__ident__ = ident
    proto.loop = asyncio.get_running_loop()  # protocols are made inside the loop
    asyncio.StreamReaderProtocol.__init__(
        proto, asyncio.StreamReader(loop=proto.loop, limit=proto.line_length_limit),
        client_connected_cb=proto._cb_client_connected, loop=proto.loop)
    proto.event_handler = handler
    proto.data_size_limit = data_size_limit
    proto.enable_SMTPUTF8 = False
    proto._decode_data = False
    proto.command_size_limits.clear()
    proto.hostname = hostname
    proto.tls_context = tls_context
    proto.require_starttls = False
    proto._timeout_duration = timeout
    proto._timeout_handle = None
    proto._tls_handshake_okay = True
    proto._tls_protocol = None
    proto._original_transport = None
    proto.session = None
    proto.envelope = None
    proto.transport = None
    proto._handler_coroutine = None
    proto._auth_require_tls = True
    proto._proxy_timeout = None
    proto._auth_callback = _smtp.login_always_fail
    proto._authenticator = None
    proto._auth_required = False
    proto._auth_methods = {}  # no AUTH: this server relays for nobody
    hooks, ehlo_ver, commands = _tables(type(proto), handler)
    proto._handle_hooks = {cmd: getattr(handler, name) for cmd, name in hooks}
    proto._ehlo_hook_ver = ehlo_ver
    proto._smtp_methods = {cmd: getattr(proto, name) for cmd, name in commands}
    proto._enforce_call_limit = False
