"""Settings from the environment: defaults, variable names, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import Settings, load_settings
from orchestrator.errors import ConfigError

BOTBUILDER_NAMES = ("MicrosoftAppId", "MicrosoftAppPassword", "MicrosoftAppType", "MicrosoftAppTenantId")


def _env_names() -> set[str]:
    names = set(BOTBUILDER_NAMES)
    for field_name, field in Settings.model_fields.items():
        names.add(field_name)
        if isinstance(field.validation_alias, str):
            names.add(field.validation_alias)
    return names


ENV_NAMES = sorted(_env_names())


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No variable of the machine's environment leaks into a test."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_env_names_cover_every_setting() -> None:
    assert {"PORT", "HOST", "REDIS_URL", "CALLFLOW_FILE", "LOG_LEVEL", "CALL_RETENTION_SECONDS"} <= set(
        ENV_NAMES
    )
    assert set(BOTBUILDER_NAMES) <= set(ENV_NAMES)


def test_defaults() -> None:
    settings = load_settings()
    assert settings.PORT == 3978
    assert settings.HOST == "0.0.0.0"
    assert settings.REDIS_URL is None
    assert settings.CALL_RETENTION_SECONDS == 86400
    assert settings.LOG_LEVEL == "INFO"
    assert settings.CALLFLOW_FILE is None
    assert settings.APP_ID == ""
    assert settings.APP_PASSWORD == ""


def test_reads_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "8080")
    monkeypatch.setenv("REDIS_URL", "redis://cache.example:6380/2")
    monkeypatch.setenv("MicrosoftAppId", "app-id-123")
    monkeypatch.setenv("MicrosoftAppPassword", "s3cret-pw")
    settings = load_settings()
    assert settings.PORT == 8080
    assert settings.REDIS_URL == "redis://cache.example:6380/2"
    assert settings.APP_ID == "app-id-123"
    assert settings.APP_PASSWORD == "s3cret-pw"
    assert "s3cret-pw" not in repr(settings)


@pytest.mark.parametrize("url", ["redis://h", "rediss://h:6380/0", "unix:///tmp/redis.sock"])
def test_redis_url_schemes_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    got = load_settings().REDIS_URL
    assert got == url


def test_empty_redis_url_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "")
    assert load_settings().REDIS_URL is None


def test_log_level_is_upper_cased(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "debug")
    assert load_settings().LOG_LEVEL == "DEBUG"


def test_callflow_file_that_exists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text("voice: x\n", encoding="utf-8")
    monkeypatch.setenv("CALLFLOW_FILE", str(path))
    got = load_settings().CALLFLOW_FILE
    assert got == path


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("PORT", "0"),
        ("REDIS_URL", "http://x"),
        ("REDIS_URL", "localhost:6379"),
        ("CALLFLOW_FILE", "/nonexistent"),
        ("LOG_LEVEL", "LOUD"),
        ("CALL_RETENTION_SECONDS", "0"),
        ("CALL_RETENTION_SECONDS", "-5"),
        ("REDIS_KEY_PREFIX", "bad prefix"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert info.value.where == name
    assert message.startswith(f"{name}: ")
    assert "\n" not in message


def test_callflow_file_error_names_the_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    monkeypatch.setenv("CALLFLOW_FILE", str(missing))
    with pytest.raises(ConfigError, match="CALLFLOW_FILE") as info:
        load_settings()
    assert str(missing) in str(info.value)


def test_variable_names_are_case_sensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("port", "1234")
    monkeypatch.setenv("microsoftappid", "lower")
    settings = load_settings()
    assert settings.PORT == 3978
    assert settings.APP_ID == ""


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"MicrosoftAppType": "Multi"}, "MicrosoftAppType"),
        ({"MicrosoftAppType": "SingleTenant"}, "MicrosoftAppId"),
        ({"MicrosoftAppType": "SingleTenant", "MicrosoftAppId": "app"}, "MicrosoftAppTenantId"),
        ({"MicrosoftAppType": "UserAssignedMSI", "MicrosoftAppId": "app"}, "MicrosoftAppTenantId"),
        ({"MicrosoftAppPassword": "secret"}, "MicrosoftAppId"),
    ],
)
def test_bot_framework_credentials_are_checked_together(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.where == named and "\n" not in str(info.value)


def test_app_type_is_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MicrosoftAppType", "singletenant")
    monkeypatch.setenv("MicrosoftAppId", "app")
    monkeypatch.setenv("MicrosoftAppTenantId", "tenant")
    assert load_settings().APP_TYPE == "SingleTenant"
