"""Bot processes for tests that need real ones: ``python app.py`` on a free loopback port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_bench(module: str, args: list[str], output: Path, timeout: float = 110) -> tuple[str, Any]:
    """``python -m <module> ARGS --json OUTPUT``, which must succeed: its output and report."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args, "--json", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, json.loads(output.read_text())


def flow_doc(name: str = "transfer-sample.yaml") -> dict[str, Any]:
    """A shipped call flow as a document to change (``default.yaml``: the product's IVR)."""
    data: dict[str, Any] = yaml.safe_load((ROOT / "orchestrator" / "flows" / name).read_text())
    return data


def write_flow(tmp_path: Path, data: dict[str, Any]) -> str:
    """``data`` as a flow file for CALLFLOW_FILE."""
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def flow_file(tmp_path: Path, **transfer: Any) -> str:
    """The sample call flow with these ``transfer`` settings, as a file for CALLFLOW_FILE."""
    data = flow_doc()
    data["queues"]["agents"].update(transfer)
    return write_flow(tmp_path, data)


class BotProcess:
    """One bot process; its output goes to a log file shown when a test fails."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str = "bot") -> None:
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> BotProcess:
        env = {
            **{k: v for k, v in os.environ.items() if k not in ("MicrosoftAppId", "MicrosoftAppPassword")},
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "LOG_LEVEL": "WARNING",
            **self.env,
        }
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - spawning does not block
                [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=log
            )
        await self.wait_ready()
        return self

    async def wait_ready(self, within: float = 30) -> None:
        async with aiohttp.ClientSession() as session, asyncio.timeout(within):
            while True:
                assert self.proc is not None and self.proc.poll() is None, self.log()
                try:
                    async with session.get(f"{self.url}/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no clean-up, as when a machine dies."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def metric(self, name: str, token: str) -> float:
        """The instance's own ``name`` from its /metrics (needs OPERATOR_TOKEN ``token``),
        summed over its labels."""
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.url}/metrics", headers=headers) as response,
        ):
            text = await response.text()
            assert response.status == 200, text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        )
