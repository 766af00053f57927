"""Settings: read from the environment in this one place, typed and validated."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import (
    AwareDatetime,
    Field,
    HttpUrl,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.errors import ConfigError, describe_validation

REDIS_SCHEMES = ("redis", "rediss", "unix")
APP_TYPES = ("MultiTenant", "SingleTenant", "UserAssignedMSI")
OPERATOR_TOKEN_MIN = 16


class Settings(BaseSettings):
    """Every environment variable the bot reads. See the README's configuration table.

    The ``APP_*`` names are the ones botbuilder's ``ConfigurationBotFrameworkAuthentication``
    looks up on this object; their environment names are botbuilder's own.
    """

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", populate_by_name=True)

    PORT: int = Field(3978, ge=1, le=65535)
    HOST: str = "0.0.0.0"
    LOG_LEVEL: str = "INFO"
    REDIS_URL: str | None = None
    REDIS_CLUSTER: bool = False  # REDIS_URL is a seed node of a Redis Cluster
    REDIS_KEY_PREFIX: str = Field("cc", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    REDIS_TIMEOUT_SECONDS: float = Field(5.0, gt=0, le=14)
    # AUTH: an ACL user (Redis 6+) and its password, or the password alone (requirepass).
    REDIS_USERNAME: str | None = None
    REDIS_PASSWORD: SecretStr | None = None
    # TLS (rediss:// only): the CA that signed the server's certificate (unset: the
    # system's CAs), and a client certificate and key when the server asks for one.
    REDIS_TLS_CA_FILE: Path | None = None
    REDIS_TLS_CERT_FILE: Path | None = None
    REDIS_TLS_KEY_FILE: Path | None = None
    REDIS_TLS_CHECK_HOSTNAME: bool = True  # the server's certificate must name REDIS_URL's host
    CALLFLOW_FILE: Path | None = None
    CALL_RETENTION_SECONDS: int = Field(86_400, gt=0)
    CALL_IDLE_TTL_SECONDS: int = Field(86_400, gt=0)
    # A live call expires this long after it started, however busy it is (0: no bound).
    CALL_MAX_LIFETIME_SECONDS: int = Field(86_400, ge=0)
    TRANSCRIPT_MAX_ENTRIES: int = Field(50, ge=1, le=1000)
    CALL_CACHE_SIZE: int = Field(4096, ge=0, le=1_000_000)  # calls kept in memory per instance
    HISTORY_MAX_ENTRIES: int = Field(1000, ge=10, le=100_000)
    SCHEDULER_POLL_SECONDS: float = Field(0.2, gt=0, le=10)
    SCHEDULER_LEASE_SECONDS: float = Field(15, ge=1, le=600)
    OUTBOX_GRACE_SECONDS: float = Field(20, ge=1, le=600)  # above a turn's 12 s budget

    # Fernet keys that seal the variables a call flow collects (account numbers, ...) in
    # Redis: the first seals, every one opens (rotation). Unset: a key of this process's own,
    # which only the embedded Redis may use (another instance could not open what it sealed).
    VARIABLES_KEYS: SecretStr | None = None

    # Opening hours are checked as if it were this moment (ISO 8601 with a zone): to try a
    # flow's hours, and for tests. Unset: the real clock.
    HOURS_CLOCK: AwareDatetime | None = None

    # The operator API, /metrics and the dashboard exist only when this is set.
    OPERATOR_TOKEN: SecretStr | None = None

    # Warm transfers (docs/warm-transfer.md). The agent side's own token: the context API
    # and the /agent page exist only when it is set; never the operator's or the channel's.
    AGENT_TOKEN: SecretStr | None = None
    AGENT_RATE_LIMIT: int = Field(60, ge=1, le=100_000)  # context requests per minute per client
    # Optionally POST each transfer's context here, signed with PUSH_SECRET (HMAC-SHA256).
    PUSH_URL: HttpUrl | None = None
    PUSH_SECRET: SecretStr | None = None

    APP_ID: str = Field("", validation_alias="MicrosoftAppId")
    APP_PASSWORD: str = Field("", validation_alias="MicrosoftAppPassword", repr=False)
    APP_TYPE: str = Field("MultiTenant", validation_alias="MicrosoftAppType")
    APP_TENANTID: str = Field("", validation_alias="MicrosoftAppTenantId")
    # botbuilder's optional endpoint settings, under its own names: another cloud, or a
    # test issuer. Unset, it uses the public cloud's. The SDK reads them with getattr.
    CHANNEL_SERVICE: str | None = None
    VALIDATE_AUTHORITY: bool = True
    TO_CHANNEL_FROM_BOT_LOGIN_URL: str | None = None
    TO_CHANNEL_FROM_BOT_OAUTH_SCOPE: str | None = None
    TO_BOT_FROM_CHANNEL_TOKEN_ISSUER: str | None = None
    OAUTH_URL: str | None = None
    TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL: str | None = None
    TO_BOT_FROM_EMULATOR_OPENID_METADATA_URL: str | None = None
    CALLER_ID: str | None = None

    @field_validator(
        "CHANNEL_SERVICE",
        "TO_CHANNEL_FROM_BOT_LOGIN_URL",
        "TO_CHANNEL_FROM_BOT_OAUTH_SCOPE",
        "TO_BOT_FROM_CHANNEL_TOKEN_ISSUER",
        "OAUTH_URL",
        "TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL",
        "TO_BOT_FROM_EMULATOR_OPENID_METADATA_URL",
        "CALLER_ID",
    )
    @classmethod
    def _optional(cls, value: str | None) -> str | None:
        return value.strip() or None if value else None  # set but empty: the SDK's default

    @field_validator("REDIS_URL")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in REDIS_SCHEMES:
            raise ValueError(f"must start with one of {', '.join(s + '://' for s in REDIS_SCHEMES)}")
        return value

    @field_validator(
        "REDIS_USERNAME", "REDIS_PASSWORD", "VARIABLES_KEYS", "PUSH_URL", "CALLFLOW_FILE", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return value or None

    @model_validator(mode="after")
    def _redis_security(self) -> Self:
        url = urlsplit(self.REDIS_URL or "")
        url_username, url_password = url_credentials(self.REDIS_URL)
        for name in ("REDIS_USERNAME", "REDIS_PASSWORD"):
            if getattr(self, name) is not None and self.REDIS_URL is None:
                raise ConfigError(name, "needs REDIS_URL (the embedded Redis has no users)")
        # redis-py lets the URL win over separate settings: one place only, or one is ignored.
        if self.REDIS_USERNAME is not None and url_username:
            raise ConfigError("REDIS_USERNAME", "REDIS_URL names a user too: set it in one place")
        if self.REDIS_PASSWORD is not None and url_password:
            raise ConfigError("REDIS_PASSWORD", "REDIS_URL has a password too: set it in one place")
        if self.REDIS_USERNAME is not None and self.REDIS_PASSWORD is None and not url_password:
            raise ConfigError("REDIS_PASSWORD", "required when REDIS_USERNAME is set")
        # The same for TLS: a URL's ?ssl_cert_reqs=none would turn verification off, and its
        # ?ssl_check_hostname=false overrule REDIS_TLS_CHECK_HOSTNAME. Only the option
        # names are shown: a value may be a secret (ssl_password) that redact_url keeps.
        if url_tls := url_tls_options(self.REDIS_URL):
            raise ConfigError(
                "REDIS_URL",
                f"TLS options may not be set in the URL ({', '.join(url_tls)}): use REDIS_TLS_CA_FILE, "
                "REDIS_TLS_CERT_FILE, REDIS_TLS_KEY_FILE and REDIS_TLS_CHECK_HOSTNAME "
                "(certificate verification cannot be turned off)",
            )
        tls = {
            "REDIS_TLS_CA_FILE": self.REDIS_TLS_CA_FILE is not None,
            "REDIS_TLS_CERT_FILE": self.REDIS_TLS_CERT_FILE is not None,
            "REDIS_TLS_KEY_FILE": self.REDIS_TLS_KEY_FILE is not None,
            "REDIS_TLS_CHECK_HOSTNAME": not self.REDIS_TLS_CHECK_HOSTNAME,
        }
        for name, is_set in tls.items():
            if is_set and url.scheme != "rediss":
                raise ConfigError(name, "applies to TLS only: REDIS_URL must start with rediss://")
        if tls["REDIS_TLS_KEY_FILE"] != tls["REDIS_TLS_CERT_FILE"]:
            missing = "REDIS_TLS_KEY_FILE" if tls["REDIS_TLS_CERT_FILE"] else "REDIS_TLS_CERT_FILE"
            other = "REDIS_TLS_CERT_FILE" if tls["REDIS_TLS_CERT_FILE"] else "REDIS_TLS_KEY_FILE"
            raise ConfigError(missing, f"required when {other} is set (a client certificate needs its key)")
        return self

    def __repr_args__(self) -> Any:
        # A password in REDIS_URL must not reach a log or a traceback through repr().
        for name, value in super().__repr_args__():
            yield name, (redact_url(value) if name == "REDIS_URL" and value else value)

    @field_validator("OPERATOR_TOKEN", "AGENT_TOKEN", "PUSH_SECRET", mode="before")
    @classmethod
    def _token(cls, value: Any) -> Any:
        value = value.strip() if isinstance(value, str) else value  # a secret file's newline
        if value and len(str(value)) < OPERATOR_TOKEN_MIN:  # the error must not echo it
            raise ValueError(f"must be at least {OPERATOR_TOKEN_MIN} characters (try: openssl rand -hex 32)")
        return value or None  # set but empty: off, as unset

    @field_validator("APP_TYPE")
    @classmethod
    def _app_type(cls, value: str) -> str:
        for known in APP_TYPES:
            if value.lower() == known.lower():
                return known
        raise ValueError(f"must be one of {', '.join(APP_TYPES)}")

    @model_validator(mode="after")
    def _credentials(self) -> Self:
        # Checked here so start-up stops with a line naming the setting, where
        # botbuilder would raise a bare Exception from inside its credential factory.
        # (A ConfigError is not a ValueError, so pydantic lets it through as it is.)
        if self.APP_PASSWORD and not self.APP_ID:
            raise ConfigError("MicrosoftAppId", "required when MicrosoftAppPassword is set")
        if self.APP_TYPE != "MultiTenant" and not self.APP_ID:
            raise ConfigError("MicrosoftAppId", f"required when MicrosoftAppType is {self.APP_TYPE}")
        if self.APP_TYPE != "MultiTenant" and not self.APP_TENANTID:
            raise ConfigError("MicrosoftAppTenantId", f"required when MicrosoftAppType is {self.APP_TYPE}")
        if (self.PUSH_URL is None) != (self.PUSH_SECRET is None):
            missing = "PUSH_SECRET" if self.PUSH_SECRET is None else "PUSH_URL"
            raise ConfigError(missing, "PUSH_URL and PUSH_SECRET go together: pushes are always signed")
        tokens = [t.get_secret_value() for t in (self.AGENT_TOKEN, self.OPERATOR_TOKEN) if t is not None]
        if len(tokens) == 2 and tokens[0] == tokens[1]:
            raise ConfigError(
                "AGENT_TOKEN", "must differ from OPERATOR_TOKEN (agents must not open the operator API)"
            )
        return self

    @field_validator("LOG_LEVEL")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {value!r}")
        return level

    @field_validator("CALLFLOW_FILE", "REDIS_TLS_CA_FILE", "REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE")
    @classmethod
    def _existing_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value


def url_credentials(url: str | None) -> tuple[str | None, str | None]:
    """The (username, password) written into a Redis URL, in its authority or its query."""
    parts = urlsplit(url or "")
    query = dict(parse_qsl(parts.query))
    username = unquote(parts.username) if parts.username else query.get("username")
    password = unquote(parts.password) if parts.password else query.get("password")
    return username or None, password or None


def url_tls_options(url: str | None) -> list[str]:
    """The names of the ``ssl_*`` query options in a Redis URL (any case, percent-encoded
    or not, with a value or without), in order: redis-py would let each one override the
    TLS settings it is given as arguments."""
    names = (name for name, _ in parse_qsl(urlsplit(url or "").query, keep_blank_values=True))
    return list(dict.fromkeys(name for name in names if name.strip().lower().startswith("ssl")))


def redact_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: fit for logs and errors."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        url = url.replace(parts.netloc, f"{parts.username or ''}:***@{host}", 1)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


def redis_user(settings: Settings) -> str:
    """The Redis user the bot logs in as, for messages: ``default`` unless one is named."""
    return settings.REDIS_USERNAME or url_credentials(settings.REDIS_URL)[0] or "default"


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; a bad value raises ConfigError naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as e:
        where, problem = describe_validation(dict(e.errors()[0]))
        raise ConfigError(where or "settings", problem) from e
