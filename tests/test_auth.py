"""Bot Framework authentication end to end, against a local OpenID issuer (tests/issuer.py)
with RS256 tokens minted here; and the request limits (size, slow bodies)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from aiohttp import WSServerHandshakeError
from aiohttp.test_utils import TestClient, TestServer
from botbuilder.integration.aiohttp import ConfigurationBotFrameworkAuthentication
from botframework.connector.auth import MicrosoftAppCredentials
from botframework.connector.auth.jwt_token_extractor import JwtTokenExtractor

import adapters.auth
import adapters.http
from adapters.auth import KEYS_LOADING, KeysUnavailable, OffLoopKeys, keys_for
from adapters.http import BOT_KEY, MAX_BODY_BYTES, STORE_KEY
from app import create_app
from orchestrator.config import Settings, load_settings
from simulator.channel import Caller, ChannelStandIn
from simulator.streaming import SERVICE_URL
from tests.conftest import BOT_ENVIRONMENT
from tests.issuer import ISSUER, TEAMS_KID, Issuer
from tests.jspeer import JsChannel
from tests.process import free_port
from tests.test_http import dump

APP_ID = "0b5e2a8c-7f4d-4c1e-9a3b-app-under-test"


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    server = Issuer().start()
    yield server
    server.stop()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in BOT_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    # Each test starts with no signing keys cached (the SDK's cache is per process).
    monkeypatch.setattr(JwtTokenExtractor, "metadataCache", {})
    # Replies need an outbound token from Azure AD; not what is under test, and offline.
    monkeypatch.setattr(MicrosoftAppCredentials, "get_access_token", lambda self, force_refresh=False: "out")


def auth_settings(monkeypatch: pytest.MonkeyPatch, metadata_url: str) -> Settings:
    monkeypatch.setenv("TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL", metadata_url)
    monkeypatch.setenv("TO_BOT_FROM_CHANNEL_TOKEN_ISSUER", ISSUER)
    return load_settings(REDIS_URL=None, APP_ID=APP_ID, APP_PASSWORD="secret", SCHEDULER_POLL_SECONDS=0.05)


@pytest.fixture
async def secured(
    clean_env: None, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TestClient[Any, Any]]:
    """The bot with authentication on, pointed at the local issuer."""
    client = TestClient(TestServer(create_app(auth_settings(monkeypatch, issuer.metadata_url))))
    await client.start_server()
    yield client
    await client.close()


@pytest.fixture
async def open_bot(clean_env: None) -> AsyncIterator[TestClient[Any, Any]]:
    """The bot without authentication (no app id)."""
    client = TestClient(TestServer(create_app(load_settings(REDIS_URL=None))))
    await client.start_server()
    yield client
    await client.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post(bot: TestClient[Any, Any], activity: dict[str, Any], headers: dict[str, str]) -> int:
    response = await bot.post("/api/messages", json=activity, headers=headers)
    return response.status


def refused_tokens(issuer: Issuer, service_url: str) -> list[tuple[str, dict[str, str]]]:
    """Every way a request's token can be wrong, as the headers that carry it."""

    def token(**changes: Any) -> str:
        return issuer.token(APP_ID, service_url, **changes)

    return [
        ("no Authorization header", {}),
        ("empty Authorization header", {"Authorization": ""}),
        ("scheme only", {"Authorization": "Bearer"}),
        ("scheme and a space", {"Authorization": "Bearer "}),
        ("garbage token", bearer("not-a-jwt")),
        ("three garbage segments", bearer("a.b.c")),
        ("three parts", {"Authorization": f"Bearer {token()} extra"}),
        ("wrong scheme", {"Authorization": f"Basic {token()}"}),
        ("expired", bearer(token(lifetime=(-7200, -3600)))),
        ("not yet valid", bearer(token(lifetime=(3600, 7200)))),
        ("signed by another key, same kid", bearer(token(key=issuer.other_key))),
        ("unknown kid", bearer(token(kid="no-such-key"))),
        ("no kid", bearer(token(kid=None))),
        ("key not endorsed for the channel", bearer(token(key=issuer.teams_key, kid=TEAMS_KID))),
        ("no audience", bearer(token(aud=None))),
        ("audience not an app id", bearer(token(aud="https://api.botframework.com"))),
        ("token for a different app", bearer(token(aud="another-app-id"))),
        ("wrong issuer", bearer(token(iss="https://login.evil.test"))),
        ("no issuer", bearer(token(iss=None))),
        ("serviceUrl claim for another serviceUrl", bearer(token(serviceurl="https://evil.test/"))),
        ("no serviceUrl claim", bearer(token(serviceurl=None))),
        ("alg none", bearer(token(algorithm="none"))),
        ("alg HS256 with the public key as secret", bearer(token(algorithm="HS256"))),
        # The SDK lets RS384/RS512 past its header check, then decodes with RS256 only.
        ("alg RS384", bearer(token(algorithm="RS384"))),
        ("alg RS512", bearer(token(algorithm="RS512"))),
    ]


async def test_a_valid_token_is_served(
    secured: TestClient[Any, Any], issuer: Issuer, channel: ChannelStandIn
) -> None:
    caller = Caller(channel.url)
    headers = bearer(issuer.token(APP_ID, channel.url))
    assert await post(secured, caller.start(), headers) == 201
    assert await post(secured, caller.say("agent"), headers) == 201
    call = (await secured.app[STORE_KEY].load(caller.conversation_id)).call
    assert call is not None and call.state == "transferring"
    assert channel.for_conversation(caller.conversation_id)[-1]["name"] == "handoff.initiate"


async def test_every_bad_token_is_a_401_and_changes_nothing(
    secured: TestClient[Any, Any], issuer: Issuer, channel: ChannelStandIn
) -> None:
    caller = Caller(channel.url)
    assert await post(secured, caller.start(), bearer(issuer.token(APP_ID, channel.url))) == 201
    store = secured.app[STORE_KEY]
    before = await dump(store, caller.conversation_id)
    sent = len(channel.for_conversation(caller.conversation_id))
    fetches = issuer.metadata_requests
    seen = {}
    for label, headers in refused_tokens(issuer, channel.url):
        response = await secured.post("/api/messages", json=caller.say("agent"), headers=headers)
        assert response.status == 401, label
        assert response.headers["WWW-Authenticate"].startswith("Bearer"), label
        reason = (await response.json())["error"]
        assert reason.startswith("missing or invalid channel token: ") and "\n" not in reason, label
        seen[label] = reason
    assert await dump(store, caller.conversation_id) == before
    assert len(channel.for_conversation(caller.conversation_id)) == sent
    # No bad token (an unknown kid included: keys an hour old at most) makes the bot refetch.
    assert issuer.metadata_requests == fetches
    logging.getLogger(__name__).info("reasons: %s", json.dumps(seen, indent=1))


async def test_a_turn_that_fails_is_not_taken_for_a_bad_token(
    secured: TestClient[Any, Any], issuer: Issuer, channel: ChannelStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only authentication answers 401: a PermissionError from inside the turn is a bug (500)."""

    async def broken(context: Any) -> None:
        raise PermissionError("a bug in the turn")

    monkeypatch.setattr(secured.app[BOT_KEY], "on_turn", broken)
    caller = Caller(channel.url)
    assert await post(secured, caller.start(), bearer(issuer.token(APP_ID, channel.url))) == 500


async def test_the_streaming_upgrade_needs_a_valid_token(
    secured: TestClient[Any, Any], issuer: Issuer
) -> None:
    valid = issuer.token(APP_ID, "https://unused.test/")
    refused = [
        {},
        {"channelid": "telephony"},
        {"Authorization": f"Bearer {valid}"},  # no channelid: nothing to check endorsements against
        {**bearer("not-a-jwt"), "channelid": "telephony"},
        {**bearer(issuer.token(APP_ID, "x", key=issuer.other_key)), "channelid": "telephony"},
        {**bearer(issuer.token(APP_ID, "x", key=issuer.teams_key, kid=TEAMS_KID)), "channelid": "telephony"},
        {**bearer(issuer.token("another-app-id", "x")), "channelid": "telephony"},
    ]
    # A channelid header that is there but empty (or blank) names no channel either: the SDK
    # would skip the endorsement check, so a key of any channel would open a connection.
    teams_only = issuer.token(APP_ID, "x", key=issuer.teams_key, kid=TEAMS_KID)
    for token in (teams_only, valid):
        refused += [{**bearer(token), "channelid": ""}, {**bearer(token), "channelid": " \t "}]
    for headers in refused:
        with pytest.raises(WSServerHandshakeError) as failed:
            await secured.ws_connect("/api/messages", headers=headers)
        assert failed.value.status == 401, headers
    ws = await secured.ws_connect("/api/messages", headers={**bearer(valid), "channelid": "telephony"})
    await ws.close()


async def test_the_streaming_upgrade_without_auth_needs_no_token_but_refuses_a_bad_one(
    open_bot: TestClient[Any, Any],
) -> None:
    ws = await open_bot.ws_connect("/api/messages")
    await ws.close()
    with pytest.raises(WSServerHandshakeError) as failed:
        await open_bot.ws_connect("/api/messages", headers={**bearer("not-a-jwt"), "channelid": "telephony"})
    assert failed.value.status == 401


async def test_a_slow_metadata_endpoint_does_not_stall_other_requests(
    clean_env: None, issuer: Issuer, channel: ChannelStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    issuer.hold()
    fetches = issuer.metadata_requests
    try:
        app = create_app(auth_settings(monkeypatch, issuer.metadata_url))
        async with TestClient(TestServer(app)) as bot:  # starts while the warm-up's fetch hangs
            await asyncio.to_thread(issuer.requested.wait, 10)
            caller = Caller(channel.url)
            first = asyncio.create_task(post(bot, caller.start(), bearer(issuer.token(APP_ID, channel.url))))
            assert (await bot.get("/healthz")).status == 200
            assert await post(bot, Caller(channel.url).start(), bearer("not-a-jwt")) == 401
            assert issuer.pending and not first.done(), "answered while the key fetch is still pending"
            issuer.release()
            assert await first == 201  # it waited for the warm-up's fetch, off the loop
            assert issuer.metadata_requests == fetches + 1
    finally:
        issuer.release()


async def test_a_request_waiting_too_long_for_the_keys_is_a_401_not_a_503(
    secured: TestClient[Any, Any], issuer: Issuer, channel: ChannelStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Authentication has its own bound, outside the turn's: the channel retries a 401."""
    caller = Caller(channel.url)
    valid = bearer(issuer.token(APP_ID, channel.url))
    assert await post(secured, caller.start(), valid) == 201
    store = secured.app[STORE_KEY]
    before = await dump(store, caller.conversation_id)
    sent = len(channel.for_conversation(caller.conversation_id))
    keys = keys_for(issuer.metadata_url)
    keys.keys, keys.last_updated = [], datetime.min  # as before the first fetch
    # A turn bound shorter than authentication's: were authentication inside the turn's
    # timeout (as it was), these would be 503s.
    monkeypatch.setattr(adapters.http, "TURN_SECONDS", 0.05)
    monkeypatch.setattr(adapters.auth, "AUTH_SECONDS", 0.2)
    issuer.hold()
    try:
        forged = bearer(issuer.token(APP_ID, channel.url, key=issuer.other_key))
        for headers in (forged, valid):
            response = await secured.post("/api/messages", json=caller.say("agent"), headers=headers)
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await response.json())["error"] == f"missing or invalid channel token: {KEYS_LOADING}"
        with pytest.raises(WSServerHandshakeError) as failed:
            await secured.ws_connect("/api/messages", headers={**valid, "channelid": "telephony"})
        assert failed.value.status == 401
        assert issuer.pending, "the key fetch is still held: the bound answered, not the fetch"
        assert await dump(store, caller.conversation_id) == before
        assert len(channel.for_conversation(caller.conversation_id)) == sent
        fetch = keys.refresh()  # the one held, not a new one
        issuer.release()
        await asyncio.wrap_future(fetch)
    finally:
        issuer.release()
    monkeypatch.setattr(adapters.http, "TURN_SECONDS", 12.0)
    assert await post(secured, caller.say("agent"), valid) == 201  # served once the keys are in


def test_authentication_is_bounded_inside_the_turn() -> None:
    assert adapters.auth.AUTH_SECONDS < adapters.http.TURN_SECONDS


async def test_stale_keys_are_refreshed_in_the_background(
    secured: TestClient[Any, Any], issuer: Issuer, channel: ChannelStandIn
) -> None:
    caller = Caller(channel.url)
    headers = bearer(issuer.token(APP_ID, channel.url))
    assert await post(secured, caller.start(), headers) == 201
    keys = keys_for(issuer.metadata_url)
    assert isinstance(keys, OffLoopKeys)
    keys.last_updated = datetime.now() - timedelta(days=2)
    issuer.hold()
    try:
        assert await post(secured, caller.say("one"), headers) == 201  # served with the old keys
        await asyncio.to_thread(issuer.requested.wait, 10)
        assert issuer.pending, "the turn was answered while the refresh is pending"
        refresh = keys.refresh()  # the one running, not a new one
        issuer.release()
        await asyncio.wrap_future(refresh)
        assert keys.last_updated > datetime.now() - timedelta(minutes=1)
    finally:
        issuer.release()


async def test_an_unreachable_metadata_endpoint_is_logged_and_refused_with_401(
    clean_env: None, issuer: Issuer, channel: ChannelStandIn, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1/.well-known/openidconfiguration"
    caplog.set_level(logging.WARNING)
    app = create_app(auth_settings(monkeypatch, dead))
    async with TestClient(TestServer(app)) as bot:
        with pytest.raises(KeysUnavailable):
            await asyncio.wrap_future(keys_for(dead).refresh())
        assert any(dead in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert (await bot.get("/healthz")).status == 200
        response = await bot.post(
            "/api/messages",
            json=Caller(channel.url).start(),
            headers=bearer(issuer.token(APP_ID, channel.url)),
        )
        assert response.status == 401
        assert "signing keys not available" in (await response.json())["error"]


def test_the_sdk_reads_its_optional_settings_from_the_environment(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TO_BOT_FROM_CHANNEL_TOKEN_ISSUER", ISSUER)
    monkeypatch.setenv("VALIDATE_AUTHORITY", "false")
    monkeypatch.setenv("CALLER_ID", "")
    settings = load_settings(REDIS_URL=None, APP_ID=APP_ID)
    assert settings.APP_ID == APP_ID and settings.TO_BOT_FROM_CHANNEL_TOKEN_ISSUER == ISSUER
    assert settings.VALIDATE_AUTHORITY is False and settings.CALLER_ID is None
    # The SDK's own factory takes them from there (its getattr).
    inner = ConfigurationBotFrameworkAuthentication(settings)._inner
    assert inner._to_bot_from_channel_token_issuer == ISSUER
    assert inner._validate_authority is False


# Request limits -------------------------------------------------------------------------


async def raw(bot: TestClient[Any, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert bot.server.port is not None
    return await asyncio.open_connection("127.0.0.1", bot.server.port)


def head(length: int | None) -> bytes:
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST /api/messages HTTP/1.1\r\nHost: bot\r\nContent-Type: application/json\r\n{size}\r\n\r\n"
    ).encode()


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def response_of(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return status, json.loads(body)


async def test_a_declared_oversize_body_is_a_413_before_it_is_read(open_bot: TestClient[Any, Any]) -> None:
    reader, writer = await raw(open_bot)
    writer.write(head(100_000_000) + b"{" + b" " * 65_536)  # 64 KB of a declared 100 MB
    await writer.drain()
    status, body = await response_of(reader)
    assert status == 413 and str(MAX_BODY_BYTES) in body["error"]
    await close(writer)


async def test_a_chunked_oversize_body_is_a_413_before_it_ends(open_bot: TestClient[Any, Any]) -> None:
    reader, writer = await raw(open_bot)
    writer.write(head(None))
    chunk = b" " * 65_536
    for _ in range(2 * MAX_BODY_BYTES // len(chunk)):  # twice the limit, and no final chunk
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    await writer.drain()
    status, body = await response_of(reader)
    assert status == 413 and body["error"]
    await close(writer)


async def test_a_trickled_body_is_cut_off_and_blocks_nobody(
    open_bot: TestClient[Any, Any], channel: ChannelStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters.http, "BODY_READ_SECONDS", 0.5)
    reader, writer = await raw(open_bot)
    writer.write(head(1000) + b'{"type": ')  # and then nothing
    await writer.drain()
    slow = asyncio.create_task(response_of(reader))
    assert await post(open_bot, Caller(channel.url).start(), {}) == 201
    assert not slow.done()
    status, body = await slow
    assert status == 408 and body["error"]
    assert await reader.read() == b"", "the connection is closed after the 408"
    await close(writer)


async def test_many_slow_requests_do_not_stop_a_fast_one(
    open_bot: TestClient[Any, Any], channel: ChannelStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters.http, "BODY_READ_SECONDS", 30.0)
    slow = [await raw(open_bot) for _ in range(100)]
    for _, writer in slow:
        writer.write(head(1000) + b'{"type": ')
        await writer.drain()
    answers = [asyncio.create_task(response_of(reader)) for reader, _ in slow]
    assert (await open_bot.get("/healthz")).status == 200
    assert await post(open_bot, Caller(channel.url).start(), {}) == 201
    assert not any(answer.done() for answer in answers)
    for answer in answers:
        answer.cancel()
    await asyncio.gather(*answers, return_exceptions=True)
    for _, writer in slow:
        await close(writer)


async def test_a_call_over_the_socket_with_authentication_on(
    secured: TestClient[Any, Any], issuer: Issuer
) -> None:
    """Microsoft's JS streaming client as the channel: its token is checked once, at the
    upgrade; the activities and the bot's replies on the socket then carry none."""
    url = str(secured.make_url("/api/messages")).replace("http", "ws", 1)
    token = issuer.token(APP_ID, SERVICE_URL)
    async with JsChannel() as js:
        refused = await js.connect(
            "bad", url, {**bearer(issuer.token("another-app-id", "x")), "channelid": "telephony"}
        )
        assert refused["event"] == "refused" and refused["status"] == 401
        assert "invalid channel token" in refused["body"]
        opened = await js.connect("s1", url, {**bearer(token), "channelid": "telephony"})
        assert opened["event"] == "connected"
        caller = Caller(SERVICE_URL)
        assert (await js.send("s1", caller.start()))["status"] == 200
        [welcome] = await js.wait_requests(1, "s1")
        assert (
            welcome["body"]["type"] == "message"
            and welcome["body"]["conversation"]["id"] == caller.conversation_id
        )
