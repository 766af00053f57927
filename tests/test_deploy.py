"""docker-compose.yml: valid for a real Compose, and the topology the design card asks for."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from typing import Any

import pytest
import yaml
from cryptography.fernet import Fernet

from app import create_app
from orchestrator.config import load_settings
from orchestrator.errors import ConfigError
from tests.conftest import IN_CI
from tests.process import ROOT

COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_compose_file_is_valid_for_docker_compose() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        if IN_CI:
            pytest.fail("docker-compose is not installed (scripts/ensure-compose installs it)")
        pytest.skip("docker-compose is not installed")
    result = subprocess.run(
        [tool, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


def test_three_bot_replicas_behind_a_load_balancer_on_3978(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["bot"]["deploy"]["replicas"] == 3
    assert services["bot"]["build"] == "."
    assert services["lb"]["ports"] == ["3978:3978"]
    assert services["bot"]["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    nginx = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    assert "http://bot:3978" in nginx and "listen 3978" in nginx


def compose_environment(compose: dict[str, Any], **dotenv: str) -> dict[str, str]:
    """The bot service's environment as Compose resolves it with ``dotenv`` as its .env."""
    resolved = {}
    for name, value in compose["services"]["bot"]["environment"].items():
        match = re.fullmatch(r"\$\{(\w+):-(.*)\}", str(value))
        resolved[name] = dotenv.get(match[1], match[2]) if match else str(value)
    return resolved


@pytest.mark.parametrize(
    "flow", ["default.yaml", "transfer-sample.yaml", "account-lookup.yaml", "warm-transfer.yaml"]
)
def test_the_replicas_start_with_the_settings_the_compose_file_names(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, flow: str
) -> None:
    """Every shipped flow runs on the replicas with VARIABLES_KEYS from .env (the replicas
    share Redis); without it, start-up stops naming it; unset optional settings pass as
    empty values and mean unset."""
    dotenv = {"VARIABLES_KEYS": Fernet.generate_key().decode(), "CALLFLOW_FILE": f"orchestrator/flows/{flow}"}
    for name, value in compose_environment(compose, **dotenv).items():
        monkeypatch.setenv(name, value)
    create_app(load_settings())
    monkeypatch.setenv("VARIABLES_KEYS", "")
    if flow != "transfer-sample.yaml":  # it collects nothing and leases no numbers
        with pytest.raises(ConfigError, match="VARIABLES_KEYS"):
            create_app(load_settings())


def test_redis_persists_with_aof(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"


def test_health_checks_ask_for_readiness(compose: dict[str, Any]) -> None:
    for name in ("bot", "lb"):
        assert "/readyz" in " ".join(compose["services"][name]["healthcheck"]["test"]), name
    assert "/readyz" in (ROOT / "Dockerfile").read_text()


def test_no_host_paths(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            assert source in named, f"{name} mounts a host path: {volume}"


def test_the_image_contains_every_package() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = {
        source
        for line in dockerfile.splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    }
    for package in [*setuptools["packages"], *(f"{m}.py" for m in setuptools["py-modules"])]:
        assert package in copied, package
