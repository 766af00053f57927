"""Redis servers of the tests' own: on free loopback ports, started and stopped by the tests."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Self

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

    def listen_args(self) -> list[str]:
        return ["--port", str(self.port)]

    def admin(self, **options: Any) -> redis.Redis:
        """A synchronous client of the server's default user, for setting it up."""
        # 10 s: a TLS connect on a loaded 2-core machine takes a good part of a second.
        return redis.Redis(port=self.port, socket_timeout=10, **options)

    def start(self) -> Self:
        command = [require_redis_server(), *self.listen_args(), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.dir), *self.args]
        with (self.dir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=log)
        client = self.admin()
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, redis.TimeoutError):  # not listening yet, or slow
                assert time.monotonic() < deadline, (self.dir / "redis.log").read_text()
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        """Stop at once, keeping nothing (as ``SHUTDOWN NOSAVE``)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files made by the test: a CA, a server certificate for 127.0.0.1 and localhost
    and a client certificate, both signed by that CA, and a second CA that signed neither."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path

    @classmethod
    def make(cls, directory: Path) -> TlsFiles:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        def issue(
            name: str, issuer: tuple[Any, x509.Certificate] | None, extensions: list[Any]
        ) -> tuple[Any, x509.Certificate]:
            key = ec.generate_private_key(ec.SECP256R1())
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
            signer_key, signer = issuer if issuer else (key, None)
            now = datetime.now(UTC)
            builder = (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(signer.subject if signer else subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5))
                .not_valid_after(now + timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
            )
            if issuer is None:
                usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
                builder = builder.add_extension(usage, critical=True)
                builder = builder.add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
                )
            else:
                builder = builder.add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
                    critical=False,
                )
            for extension in extensions:
                builder = builder.add_extension(extension, critical=False)
            return key, builder.sign(signer_key, hashes.SHA256())

        def write(path: Path, key: Any, cert: x509.Certificate) -> None:
            path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            if key is not None:
                key_path = path.with_suffix(".key")
                key_path.write_bytes(
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
                key_path.chmod(0o600)

        directory.mkdir(parents=True, exist_ok=True)
        ca = issue("orchestrator test CA", None, [])
        server = issue(
            "127.0.0.1",
            ca,
            [
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
                ),
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
            ],
        )
        client = issue("operator", ca, [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])])
        other = issue("some other CA", None, [])
        files = cls(
            ca=directory / "ca.crt",
            server_cert=directory / "server.crt",
            server_key=directory / "server.key",
            client_cert=directory / "client.crt",
            client_key=directory / "client.key",
            other_ca=directory / "other-ca.crt",
        )
        write(files.ca, None, ca[1])
        write(files.server_cert, *server)
        write(files.client_cert, *client)
        write(files.other_ca, None, other[1])
        return files


class TlsRedisServer(RedisServer):
    """A ``redis-server`` that speaks TLS only, on its one port. ``auth_clients`` is its
    ``tls-auth-clients``: ``yes`` asks every client for a certificate signed by the CA."""

    def __init__(self, workdir: Path, tls: TlsFiles, auth_clients: str = "no", *args: str) -> None:
        super().__init__(workdir, None, *args)
        self.tls = tls
        self.auth_clients = auth_clients

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def listen_args(self) -> list[str]:
        tls = self.tls
        return [
            "--port", "0", "--tls-port", str(self.port),
            "--tls-cert-file", str(tls.server_cert), "--tls-key-file", str(tls.server_key),
            "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", self.auth_clients,
        ]  # fmt: skip

    def admin(self, **options: Any) -> redis.Redis:
        return super().admin(
            ssl=True,
            ssl_ca_certs=str(self.tls.ca),
            ssl_certfile=str(self.tls.client_cert),
            ssl_keyfile=str(self.tls.client_key),
            **options,
        )


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
