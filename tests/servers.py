"""Redis servers of the tests' own: on free loopback ports, started and stopped by the tests."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.process import free_port

REAL_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() == "true"


def require_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        message = "redis-server is not installed (scripts/ensure-redis installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


class RedisServer:
    """One ``redis-server`` process; ``stop`` and ``start`` again keep the port."""

    def __init__(self, workdir: Path, port: int | None = None, *args: str) -> None:
        self.port = port or free_port()
        self.dir = workdir / str(self.port)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        command = [require_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.dir), *self.args]
        with (self.dir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=log)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, (self.dir / "redis.log").read_text()
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        """Stop at once, keeping nothing (as ``SHUTDOWN NOSAVE``)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = random.randint(20_000, 50_000)
        if all(_bindable(p) for p in (port, port + 10_000)):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class RedisClusterServers:
    """A local cluster of three masters and no replicas."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(workdir, cluster_port(), "--cluster-enabled", "yes", "--cluster-node-timeout", "2000")
            for _ in range(masters)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        for node in self.nodes:
            client = redis.Redis(port=node.port, decode_responses=True)
            while "cluster_state:ok" not in str(client.execute_command("CLUSTER", "INFO")):  # type: ignore[no-untyped-call]
                assert time.monotonic() < deadline, "the cluster did not come up"
                time.sleep(0.1)
            client.close()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
