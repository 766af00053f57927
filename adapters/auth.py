"""Channel tokens: every failure a 401, and signing keys fetched off the event loop.

botbuilder 4.17.1 validates a channel token well but fails badly: a garbage token, an
expired one, one signed by another key, an unknown key id or a key the channel does not
endorse each raise something other than ``PermissionError`` (``jwt`` errors, a bare
``Exception``, ``IndexError``, ``AttributeError``), which ``CloudAdapter`` turns into a
500. And it fetches the channel's OpenID metadata and keys with blocking ``requests``
calls, without a timeout, inside the event loop, on the first request and again every
24 hours, stalling every call the process serves.

- ``CheckedAuthentication`` wraps the SDK's authentication: whatever its authenticate
  methods raise becomes ``Unauthorized`` (a 401), and nothing else is caught, so a bug in
  a turn is never mistaken for a bad token.
- ``install_key_cache`` swaps the SDK's per-URL key cache for ``OffLoopKeys``: fetched on
  a thread with a timeout, one fetch at a time, stale keys served while new ones load.
- ``warm_keys`` loads the channel's keys at start-up, so the first call does not wait.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable
from datetime import datetime, timedelta
from typing import Any

import requests
from botbuilder.schema import Activity
from botframework.connector.auth import (
    AuthenticateRequestResult,
    AuthenticationConstants,
    BotFrameworkAuthentication,
    ChannelValidation,
    ClaimsIdentity,
    ConnectorFactory,
    GovernmentConstants,
    UserTokenClient,
)
from botframework.connector.auth.jwt_token_extractor import (
    JwtTokenExtractor,
    _OpenIdConfig,
    _OpenIdMetadata,
)
from botframework.connector.skills import BotFrameworkClient
from jwt.algorithms import RSAAlgorithm

log = logging.getLogger(__name__)

KEYS_MAX_AGE = timedelta(days=1)  # the SDK's: refetch keys a day old
UNKNOWN_KID_REFETCH = timedelta(hours=1)  # the SDK's: an unknown key id refetches at most hourly
FETCH_TIMEOUT = (3.05, 10.0)  # connect, read: the SDK has none, so a dead endpoint hung a thread
RETRY_SECONDS = 5.0  # after a failed fetch, requests fail fast this long before the next try
# A request waits this long at most for the signing keys, then is refused with 401 (the
# channel retries); well inside adapters.http.TURN_SECONDS, which a key fetch (up to two
# of FETCH_TIMEOUT) could otherwise use up, leaving a forged token a 503 instead.
AUTH_SECONDS = 5.0
KEYS_LOADING = "signing keys not loaded yet"

_BEARER = re.compile(r"Bearer [^\s]+")


class Unauthorized(Exception):
    """The request's channel token is missing or not valid (the reason says which)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeysUnavailable(Exception):
    """The channel's signing keys could not be fetched."""

    def __init__(self, url: str, cause: BaseException) -> None:
        super().__init__(f"signing keys not available from {url}: {cause!r}"[:300])


class UnknownKey(Exception):
    """The token names a key the channel does not publish."""


def channel_metadata_url(config: Any) -> str:
    """The OpenID metadata URL the SDK checks channel tokens against, for this configuration."""
    url = getattr(config, "TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL", None)
    if url:
        return str(url)
    if getattr(config, "CHANNEL_SERVICE", None) == GovernmentConstants.CHANNEL_SERVICE:
        return str(GovernmentConstants.TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL)
    return str(
        ChannelValidation.open_id_metadata_endpoint
        or AuthenticationConstants.TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL
    )


def _reason(error: BaseException) -> str:
    """A one-line reason for the 401 body and the log."""
    if isinstance(error, (KeysUnavailable, UnknownKey)):
        text = str(error)
    elif isinstance(error, PermissionError):
        text = str(error) or "not authorized"
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return " ".join(text.split())[:200]


def _check_header(auth_header: str | None) -> None:
    """A header that is there must be ``Bearer <token>``: the SDK fails on other shapes
    with an AttributeError (absent is the SDK's to judge: fine when auth is off)."""
    if auth_header is not None and not _BEARER.fullmatch(auth_header):
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")


async def _identified(authenticating: Awaitable[AuthenticateRequestResult]) -> AuthenticateRequestResult:
    """The SDK's result, or ``Unauthorized`` for whatever it raised, an empty identity, or
    no answer within ``AUTH_SECONDS`` (only a wait for the signing keys takes that long)."""
    bound = asyncio.timeout(AUTH_SECONDS)
    try:
        async with bound:
            result = await authenticating
    except Exception as e:
        if bound.expired():
            log.warning("a request was refused after %s s waiting for the signing keys", AUTH_SECONDS)
            raise Unauthorized(KEYS_LOADING) from e
        raise Unauthorized(_reason(e)) from e
    if result is None or result.claims_identity is None:
        raise Unauthorized("no identity in the token")
    return result


class CheckedAuthentication(BotFrameworkAuthentication):  # type: ignore[misc]
    """The SDK's authentication, with every authentication failure raised as ``Unauthorized``."""

    def __init__(self, inner: BotFrameworkAuthentication) -> None:
        self.inner = inner

    async def authenticate_request(
        self, activity: Activity, auth_header: str | None
    ) -> AuthenticateRequestResult:
        _check_header(auth_header)
        return await _identified(self.inner.authenticate_request(activity, auth_header))

    async def authenticate_streaming_request(
        self, auth_header: str | None, channel_id_header: str | None
    ) -> AuthenticateRequestResult:
        _check_header(auth_header)
        # The SDK refuses a missing channelid (auth on) but takes "" as "no channel to check
        # the key's endorsements against": a key of any channel would do. Blank is missing.
        channel_id = (channel_id_header or "").strip() or None
        if not auth_header:
            # The SDK's streaming path demands a token even with authentication off; its
            # request path decides as for a POST: anonymous when off, refused when on.
            result = await _identified(
                self.inner.authenticate_request(Activity(channel_id=channel_id or ""), auth_header)
            )
            result.connector_factory = None  # the streaming path gives its own
            return result
        try:
            return await _identified(self.inner.authenticate_streaming_request(auth_header, channel_id))
        except Unauthorized as e:
            if channel_id is None:
                raise Unauthorized(f"{e.reason}; the channelid header is missing or empty") from e
            raise

    async def authenticate_channel_request(self, auth_header: str) -> ClaimsIdentity:
        try:
            return await self.inner.authenticate_channel_request(auth_header)
        except Exception as e:
            raise Unauthorized(_reason(e)) from e

    def create_connector_factory(self, claims_identity: ClaimsIdentity) -> ConnectorFactory:
        return self.inner.create_connector_factory(claims_identity)

    async def create_user_token_client(self, claims_identity: ClaimsIdentity) -> UserTokenClient:
        return await self.inner.create_user_token_client(claims_identity)

    def create_bot_framework_client(self) -> BotFrameworkClient:
        return self.inner.create_bot_framework_client()

    def get_originating_audience(self) -> str:
        return str(self.inner.get_originating_audience())


class OffLoopKeys(_OpenIdMetadata):  # type: ignore[misc]
    """One metadata URL's signing keys, as the SDK's ``_OpenIdMetadata`` keeps them, but
    fetched on a thread (with a timeout), one fetch at a time however many requests wait,
    and refreshed in the background while the old keys keep serving."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._lock = threading.Lock()
        self._pending: concurrent.futures.Future[None] | None = None
        self._failed: concurrent.futures.Future[None] | None = None
        self._failed_at = float("-inf")

    def refresh(self) -> concurrent.futures.Future[None]:
        """Start a fetch unless one is running (or failed moments ago); its future."""
        with self._lock:
            if self._pending is not None:
                return self._pending
            if self._failed is not None and time.monotonic() - self._failed_at < RETRY_SECONDS:
                return self._failed
            future: concurrent.futures.Future[None] = concurrent.futures.Future()
            future.set_running_or_notify_cancel()  # a waiter's cancellation must not cancel it
            self._pending = future
        threading.Thread(target=self._fetch, args=(future,), name="openid-keys", daemon=True).start()
        return future

    def _fetch(self, future: concurrent.futures.Future[None]) -> None:
        try:
            response = requests.get(self.url, timeout=FETCH_TIMEOUT)
            response.raise_for_status()
            jwks_uri = response.json()["jwks_uri"]
            response = requests.get(jwks_uri, timeout=FETCH_TIMEOUT)
            response.raise_for_status()
            keys = response.json()["keys"]
            if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
                raise ValueError("'keys' is not a list of objects")
        except Exception as e:
            log.warning("channel signing keys could not be fetched from %s: %r", self.url, e)
            with self._lock:
                self._pending, self._failed, self._failed_at = None, future, time.monotonic()
            future.set_exception(KeysUnavailable(self.url, e))
            return
        with self._lock:
            self.keys, self.last_updated = keys, datetime.now()
            self._pending, self._failed = None, None
        log.info("%d channel signing keys loaded from %s", len(keys), self.url)
        future.set_result(None)

    async def get(self, key_id: str | None) -> _OpenIdConfig:
        """The key ``key_id`` (the SDK's contract), raising ``UnknownKey`` where it raised IndexError."""
        now = datetime.now()
        if self.last_updated < now - KEYS_MAX_AGE:
            fetch = self.refresh()
            if not self.keys:
                await asyncio.wrap_future(fetch)
        key = self._find(key_id)
        if key is None and self.last_updated < now - UNKNOWN_KID_REFETCH:
            await asyncio.wrap_future(self.refresh())
            key = self._find(key_id)
        if key is None:
            raise UnknownKey(f"no signing key with id {key_id!r} at {self.url}"[:200])
        return key

    def _find(self, key_id: str | None) -> _OpenIdConfig | None:
        for jwk in self.keys:
            if key_id is not None and jwk.get("kid") == key_id:
                try:
                    public_key = RSAAlgorithm.from_jwk(json.dumps(jwk))
                except Exception as e:  # a malformed key is as good as none
                    log.warning("signing key %r from %s is not usable: %r", key_id, self.url, e)
                    return None
                endorsements = jwk.get("endorsements", [])
                return _OpenIdConfig(public_key, endorsements if isinstance(endorsements, list) else [])
        return None


class _KeyCache(dict[str, OffLoopKeys]):
    """``JwtTokenExtractor.metadataCache``: makes an ``OffLoopKeys`` for any URL the SDK asks for."""

    def get(self, url: str, default: Any = None) -> OffLoopKeys:
        keys = super().get(url)
        if keys is None:
            keys = self.setdefault(url, OffLoopKeys(url))
        return keys


def install_key_cache() -> _KeyCache:
    """Make every ``JwtTokenExtractor`` (built per request by the SDK) use ``OffLoopKeys``."""
    cache = JwtTokenExtractor.metadataCache
    if not isinstance(cache, _KeyCache):
        cache = _KeyCache()
        JwtTokenExtractor.metadataCache = cache
    return cache


def keys_for(url: str) -> OffLoopKeys:
    return install_key_cache().get(url)


async def warm_keys(url: str) -> bool:
    """Fetch the channel's keys now (off the loop); False, logged, when the endpoint fails."""
    try:
        await asyncio.wrap_future(keys_for(url).refresh())
    except KeysUnavailable:
        log.warning(
            "channel signing keys are not loaded (%s): requests are refused with 401 until they are",
            url,
        )
        return False
    return True
