"""rediss://: the Redis backend over real TLS (tests/redis_servers.TlsProxy in front of a real redis-server), with
the URL's TLS options: the CA to verify the server with, its name, and a client certificate (mutual TLS)."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from engine import BackendUnavailable, Config, InvalidEvent, SessionStore, Tier
from engine.core.backend_url import parse_backend
from engine.distributed.redis_host import Keys, sessions_in_redis
from tests.support.redis_servers import RedisServer, TlsProxy


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


def proxy_for(server: RedisServer, authority: trustme.CA, *names: str, client_ca: trustme.CA | None = None
              ) -> TlsProxy:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert(*names).configure_cert(context)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(context)
    return TlsProxy(server.port, context).start()


@pytest.fixture
def tls(redis_server: RedisServer, ca: tuple[trustme.CA, Path]) -> Iterator[TlsProxy]:
    proxy = proxy_for(redis_server, ca[0], "localhost")
    try:
        yield proxy
    finally:
        proxy.stop()


def store_at(url: str, **overrides: Any) -> SessionStore:
    return SessionStore(Config(enabled=True, tick_ms=0, backend=url, redis_buckets=4, ask_timeout_s=5.0,
                               **overrides))


def test_a_store_over_tls_serves_and_redis_holds_what_it_wrote(
        tls: TlsProxy, redis_server: RedisServer, ca: tuple[trustme.CA, Path]) -> None:
    url = f"rediss://localhost:{tls.port}/0?ssl_ca_certs={ca[1]}"
    with store_at(url) as store:
        store.set_session("tls-1", "openai/gpt-4o", Tier.MEDIUM)
        store.add_session_cost("tls-1", 250_000)
        assert store.get_session("tls-1").model == "openai/gpt-4o"
    assert tls.handshakes >= 1
    # A second replica over TLS reads the same truth; the server itself holds it (read in the clear).
    with store_at(url) as other:
        assert other.get_session_cost_usd("tls-1") == pytest.approx(0.25)
    with redis_server.client() as plain:
        held = sessions_in_redis(plain, Keys("se", 4))
    assert held["tls-1"].model == "openai/gpt-4o" and held["tls-1"].session_cost_micros == 250_000


def test_the_server_is_verified_against_the_given_ca_and_its_name(
        tls: TlsProxy, redis_server: RedisServer, ca: tuple[trustme.CA, Path]) -> None:
    # No CA given: the system's store does not know this one. The error says why, and names no password.
    with pytest.raises(BackendUnavailable) as untrusted:
        store_at(f"rediss://app:s3cret@localhost:{tls.port}/0")
    assert "TLS handshake failed" in str(untrusted.value) and "certificate verify failed" in str(untrusted.value)
    assert "s3cret" not in str(untrusted.value) and "app:" not in str(untrusted.value)
    # The certificate names localhost, not 127.0.0.1: refused unless the name check is turned off.
    with pytest.raises(BackendUnavailable, match="TLS handshake failed"):
        store_at(f"rediss://127.0.0.1:{tls.port}/0?ssl_ca_certs={ca[1]}")
    with store_at(f"rediss://127.0.0.1:{tls.port}/0?ssl_ca_certs={ca[1]}&ssl_check_hostname=false") as store:
        store.set_session("by-ip", "m", Tier.SIMPLE)
        assert store.get_session("by-ip").model == "m"
    # Another CA's server is refused even with the name right.
    other = trustme.CA()
    stranger = proxy_for(redis_server, other, "localhost")
    try:
        with pytest.raises(BackendUnavailable, match="certificate verify failed"):
            store_at(f"rediss://localhost:{stranger.port}/0?ssl_ca_certs={ca[1]}")
    finally:
        stranger.stop()


def test_mutual_tls_with_a_client_certificate(
        redis_server: RedisServer, ca: tuple[trustme.CA, Path], tmp_path: Path) -> None:
    authority, ca_path = ca
    clients = trustme.CA()
    identity = clients.issue_cert("router-1")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    identity.cert_chain_pems[0].write_to_path(str(cert))
    identity.private_key_pem.write_to_path(str(key))
    proxy = proxy_for(redis_server, authority, "localhost", client_ca=clients)
    try:
        with pytest.raises(BackendUnavailable, match="Redis at rediss://localhost"):
            store_at(f"rediss://localhost:{proxy.port}/0?ssl_ca_certs={ca_path}")  # no client certificate
        url = f"rediss://localhost:{proxy.port}/0?ssl_ca_certs={ca_path}&ssl_certfile={cert}&ssl_keyfile={key}"
        with store_at(url) as store:
            store.set_session("mtls", "m", Tier.COMPLEX)
            assert store.get_session("mtls").tier == Tier.COMPLEX
    finally:
        proxy.stop()


@pytest.mark.parametrize(("url", "says"), [
    ("rediss://h:6380/0?ssl_ca_cert=/x", "unknown URL option 'ssl_ca_cert'"),
    ("redis://h:6379/0?ssl_cert_reqs=none", "they need rediss://"),
    ("redis+cluster://h:1,h:2?ssl_cert_reqs=none", "they need rediss://"),
    ("rediss://h:6380/0?ssl_ca_certs=/no/such/file.pem", "ssl_ca_certs must name a readable file"),
    ("rediss://h:6380/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of required, optional, none"),
    ("rediss://h:6380/0?ssl_check_hostname=yes", "ssl_check_hostname must be true or false"),
    ("rediss://h:6380/0?ssl_keyfile=/etc/hostname", "ssl_keyfile needs ssl_certfile"),
    ("rediss://h:6380/0?ssl_cert_reqs=none&ssl_cert_reqs=required", "given twice"),
    ("rediss://u:pw@h:6380/0?novalue", "name=value pairs"),
])
def test_bad_tls_options_name_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(InvalidEvent) as err:
        Config(enabled=True, backend=url)
    assert err.value.field == "backend" and says in str(err.value) and "pw" not in str(err.value)


def test_options_reach_the_client_and_verification_is_on_by_default(ca: tuple[trustme.CA, Path]) -> None:
    assert dict(parse_backend("rediss://h:6380/0").tls_options) == {"ssl_check_hostname": True}
    assert dict(parse_backend(f"rediss://h:6380/2?ssl_ca_certs={ca[1]}").tls_options) == {
        "ssl_check_hostname": True, "ssl_ca_certs": str(ca[1])}
    # Turning verification off turns the name check off too (TLS still encrypts); it is never the default.
    assert dict(parse_backend("rediss://h:6380/0?ssl_cert_reqs=none").tls_options) == {
        "ssl_check_hostname": False, "ssl_cert_reqs": "none"}
    assert parse_backend("rediss://h:6380/3?ssl_cert_reqs=none").db == 3
    assert parse_backend("redis://h:6379/0").tls_options == ()
