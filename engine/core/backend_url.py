"""A backend URL, parsed: where a store's sessions live (``Config.backend``), and the backend errors.

- ``memory`` (the default): the shard's dict is the truth; records go to the file log.
- ``redis://``, ``rediss://``, ``unix://``, ``redis+cluster://``: Redis holds the truth and the
  audit streams (docs/distributed.md).

Pure: it parses the URL without importing redis-py, so ``Config`` validates a backend on a
machine without the ``redis`` extra; nothing here ever renders a password. The factory that
opens a backend is engine/_backend.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from events import EngineError, InvalidEvent

__all__ = [
    "BackendError", "BackendUnavailable", "RedisTarget", "parse_backend",
]

#: Environment variables read when the URL carries no credentials.
PASSWORD_ENV = "SESSION_ENGINE_REDIS_PASSWORD"
USERNAME_ENV = "SESSION_ENGINE_REDIS_USERNAME"

SCHEMES = ("redis", "rediss", "unix", "redis+cluster")


class BackendUnavailable(EngineError):
    """The backend (Redis) could not be reached, or did not answer, within the ask deadline."""


class BackendError(EngineError):
    """The backend holds something the engine cannot use (a foreign key, a corrupt record...)."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed Redis URL. ``display`` is the URL without credentials: the only form ever shown."""

    scheme: str
    hosts: tuple[tuple[str, int], ...] = ()
    path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    display: str = ""
    #: rediss:// only: redis-py's TLS settings from the URL's query (``TLS_OPTIONS``), as keyword arguments.
    tls_options: tuple[tuple[str, Any], ...] = ()

    @property
    def cluster(self) -> bool:
        return self.scheme == "redis+cluster"

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"


def _bad(rule: str) -> InvalidEvent:
    return InvalidEvent("backend", rule)


#: The query options a rediss:// URL takes (redis-py's names, as its own ``from_url`` reads them).
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_CERT_REQS = ("required", "optional", "none")


def _tls_options(scheme: str, query: str) -> tuple[tuple[str, Any], ...]:
    """``?ssl_ca_certs=/path/ca.pem&...`` of a rediss:// URL: the CA bundle to verify the server with (else
    the system's), a client certificate and key (mutual TLS), ``ssl_cert_reqs`` and
    ``ssl_check_hostname`` (default true: the server's certificate must name the host in the URL)."""
    if not query:
        return (("ssl_check_hostname", True),) if scheme == "rediss" else ()
    if scheme != "rediss":
        raise _bad(f"URL options (?{TLS_OPTIONS[0]}=...) are TLS settings: they need rediss://")
    try:
        pairs = parse_qs(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise _bad("the URL's options must be name=value pairs joined by &") from None
    options: dict[str, Any] = {"ssl_check_hostname": True}
    for name, values in pairs.items():
        if name not in TLS_OPTIONS:
            raise _bad(f"unknown URL option {_safe(name)!r} (rediss:// takes {', '.join(TLS_OPTIONS)})")
        if len(values) > 1:
            raise _bad(f"the URL option {name} is given twice")
        value = values[0]
        if name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            if not os.path.isfile(value) or not os.access(value, os.R_OK):
                raise _bad(f"{name} must name a readable file (a PEM file)")
            options[name] = value
        elif name == "ssl_cert_reqs":
            if value not in _CERT_REQS:
                raise _bad(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")
            options[name] = value
        else:
            if value.lower() not in ("true", "false"):
                raise _bad("ssl_check_hostname must be true or false")
            options[name] = value.lower() == "true"
    if "ssl_keyfile" in options and "ssl_certfile" not in options:
        raise _bad("ssl_keyfile needs ssl_certfile (the client certificate it belongs to)")
    if options.get("ssl_cert_reqs") == "none":
        options["ssl_check_hostname"] = False  # nothing is verified: no name either (TLS still encrypts)
    return tuple(options.items())


def parse_backend(url: Any) -> RedisTarget | None:
    """None for ``"memory"``; else the Redis target. Raises ``InvalidEvent("backend", ...)``.

    The error never repeats the URL (it may hold a password): it names the part that is wrong.
    """
    if type(url) is not str:
        raise _bad(f"must be a str, got {type(url).__name__}")
    if url == "memory":
        return None
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise _bad('must be "memory" or a URL redis://, rediss://, unix:// or redis+cluster://host:port[,host:port]')
    if scheme == "unix":
        parts = urlsplit(url)
        if not parts.path:
            raise _bad("a unix:// URL needs the socket's path (unix:///path/redis.sock)")
        query = parse_qs(parts.query)
        db = _db(query.get("db", ["0"])[0])
        return _with_credentials(RedisTarget("unix", path=parts.path, db=db, display=f"unix://{parts.path}"),
                                 parts.username, parts.password)
    rest = url[len(scheme) + 3:]
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        userinfo, hostpart = "", rest
    hostpart, _, query = hostpart.partition("?")
    hostpart, _, dbpart = hostpart.partition("/")
    hosts = []
    for item in hostpart.split(","):
        host, colon, port = item.rpartition(":")
        if not colon:
            host, port = item, "6379"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _bad(f"{scheme}:// needs host:port (a port 1-65535), got {_safe(item)!r}")
        hosts.append((host.strip("[]"), int(port)))
    if len(hosts) > 1 and scheme != "redis+cluster":
        raise _bad("several hosts need redis+cluster://")
    if scheme == "redis+cluster" and dbpart not in ("", "0"):
        raise _bad("Redis Cluster has only db 0")
    db = _db(dbpart or "0")
    tls = _tls_options(scheme, query)
    user = password = None
    if userinfo:
        user, colon, password = userinfo.partition(":")
        user, password = unquote(user) or None, unquote(password) if colon else None
    display = f"{scheme}://" + ",".join(f"{h}:{p}" for h, p in hosts) + ("" if scheme == "redis+cluster" else f"/{db}")
    return _with_credentials(RedisTarget(scheme, hosts=tuple(hosts), db=db, display=display, tls_options=tls),
                             user, password)


def _db(text: str) -> int:
    if not text.isdigit():
        raise _bad(f"the database must be a number, got {_safe(text)!r}")
    return int(text)


def _safe(text: str) -> str:
    """A fragment fit for an error message: no credentials, bounded length."""
    return text.rpartition("@")[2][:60]


def _with_credentials(target: RedisTarget, user: str | None, password: str | None) -> RedisTarget:
    user = user or os.environ.get(USERNAME_ENV) or None
    password = password or os.environ.get(PASSWORD_ENV) or None
    return RedisTarget(target.scheme, target.hosts, target.path, target.db, user, password, target.display,
                       target.tls_options)
