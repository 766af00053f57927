"""The SDK workaround in adapters/channel_client.py: still needed, and still right.

These fail when a botbuilder upgrade changes what the workaround relies on: if the stock
adapter stops building clients per activity (the workaround is then unneeded: re-measure
with ``python -m bench`` and remove it), or if the SDK's client starts sending a reply
differently from ours (the workaround is then wrong).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from botbuilder.core import TurnContext
from botbuilder.integration.aiohttp import CloudAdapter, ConfigurationBotFrameworkAuthentication
from botbuilder.schema import Activity, ActivityTypes, ChannelAccount, ConversationAccount
from botframework.connector import aio as connector_aio
from botframework.connector.auth import (
    AuthenticationConstants,
    ClaimsIdentity,
    MicrosoftAppCredentials,
)
from botframework.connector.auth import _user_token_client_impl as token_clients
from msrest.universal_http.async_requests import AsyncRequestsHTTPSender

from adapters.channel_client import ChannelError, PooledAuthentication
from orchestrator.config import Settings

APP_ID = "00000000-0000-0000-0000-0000000000aa"
TOKEN = "token-for-the-channel"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    peer: Any


class RecordingChannel:
    """A serviceUrl endpoint that keeps each request whole, and which TCP connection it came on."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.status = 200
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self, prefix: str = "") -> RecordingChannel:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/{prefix}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append(Seen(request.method, request.raw_path, dict(request.headers), body, peer))
        if self.status != 200:
            return web.json_response({"error": {"code": "Unavailable"}}, status=self.status)
        return web.json_response({"id": f"sent-{len(self.seen)}"})


@pytest.fixture
async def recorder() -> AsyncIterator[RecordingChannel]:
    channel = await RecordingChannel().start()
    yield channel
    await channel.stop()


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """App credentials hand out a known token instead of asking Entra ID (no network here)."""
    monkeypatch.setattr(MicrosoftAppCredentials, "get_access_token", lambda self, force_refresh=False: TOKEN)


@pytest.fixture
def constructions(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """How many SDK connector and user-token clients get built."""
    counts = {"connector": 0, "user_token": 0}

    def counting(cls: type, name: str) -> None:
        original: Callable[..., None] = cls.__init__  # type: ignore[misc]

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            counts[name] += 1
            original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", init)

    counting(connector_aio.ConnectorClient, "connector")
    counting(token_clients._UserTokenClientImpl, "user_token")
    yield counts


def settings(app_id: str = "") -> Settings:
    return Settings(MicrosoftAppId=app_id, MicrosoftAppPassword="secret" if app_id else "")  # type: ignore[call-arg]


def message(service_url: str, conversation_id: str = "call-1", number: int = 1) -> Activity:
    return Activity(
        type=ActivityTypes.message,
        id=f"activity-{number}",
        text="hello",
        channel_id="telephony",
        service_url=service_url,
        conversation=ConversationAccount(id=conversation_id),
        from_property=ChannelAccount(id="+14255550123"),
        recipient=ChannelAccount(id="bot"),
    )


async def echo(turn_context: TurnContext) -> None:
    await turn_context.send_activity(f"you said {turn_context.activity.text}")


async def run_turns(adapter: CloudAdapter, service_url: str, count: int) -> None:
    for number in range(1, count + 1):
        await adapter.process_activity("", message(service_url, number=number), echo)


async def test_stock_adapter_still_builds_clients_per_activity(
    recorder: RecordingChannel, constructions: dict[str, int]
) -> None:
    """If this fails, botbuilder stopped building clients per activity (or stopped posting
    with requests): the workaround may be unneeded. Re-measure and remove it."""
    adapter = CloudAdapter(ConfigurationBotFrameworkAuthentication(settings()))
    await run_turns(adapter, recorder.url, 3)

    assert len(recorder.seen) == 3
    assert constructions == {"connector": 3, "user_token": 3}
    factory = adapter.bot_framework_authentication.create_connector_factory(ClaimsIdentity({}, True))
    client = await factory.create(recorder.url, None)
    assert isinstance(client._client.config.pipeline._sender.driver, AsyncRequestsHTTPSender)


async def test_pooled_adapter_builds_clients_once_and_reuses_one_connection(
    recorder: RecordingChannel, constructions: dict[str, int]
) -> None:
    auth = PooledAuthentication(ConfigurationBotFrameworkAuthentication(settings()))
    adapter = CloudAdapter(auth)
    try:
        await run_turns(adapter, recorder.url, 20)

        async def proactive(turn_context: TurnContext) -> None:
            await turn_context.send_activity("still there?")

        reference = TurnContext.get_conversation_reference(message(recorder.url))
        for _ in range(3):  # the scheduler's path
            await adapter.continue_conversation(reference, proactive, None)
    finally:
        await auth.close()

    assert len(recorder.seen) == 23
    # One client per audience: replies (the request's) and proactive sends (the channel's).
    assert constructions == {"connector": 2, "user_token": 1}
    assert len({seen.peer for seen in recorder.seen}) == 1  # one keep-alive connection


def requests_alike(seen: Seen) -> tuple[str, str, dict[str, str | None], Any]:
    wanted = ("Accept", "Content-Type", "x-ms-conversation-id", "Authorization", "User-Agent")
    return seen.method, seen.path, {name: seen.headers.get(name) for name in wanted}, seen.body


@pytest.mark.parametrize("app_id", ["", APP_ID], ids=["anonymous", "app-credentials"])
@pytest.mark.parametrize("prefix", ["", "channel/v1/"], ids=["root", "path-prefix"])
async def test_replies_are_sent_as_the_sdk_sends_them(
    app_id: str, prefix: str, tokens: None, recorder: RecordingChannel
) -> None:
    """Same method, URL (quoting too), headers and JSON body as the SDK's own client."""
    service_url = recorder.url + prefix
    claims = ClaimsIdentity({AuthenticationConstants.AUDIENCE_CLAIM: app_id} if app_id else {}, True)
    stock = ConfigurationBotFrameworkAuthentication(settings(app_id))
    pooled = PooledAuthentication(ConfigurationBotFrameworkAuthentication(settings(app_id)))
    # ASCII: requests sends a header as Latin-1 (and fails beyond it), aiohttp as UTF-8.
    conversation = "a:b/c d{}?#%"
    reply = message(service_url, conversation)
    reply.text, reply.speak, reply.reply_to_id = "<b>hi</b> ñ", "<speak>hi</speak>", "id/with space"
    reply.channel_data = {"replyKey": "3.0"}
    sends: list[Callable[[Any], Any]] = [
        lambda client: client.conversations.reply_to_activity(conversation, reply.reply_to_id, reply),
        lambda client: client.conversations.send_to_conversation(conversation, reply),
    ]
    try:
        for send in sends:
            for auth in (stock, pooled):
                client = await auth.create_connector_factory(claims).create(service_url, None)
                response = await send(client)
                assert response.id == f"sent-{len(recorder.seen)}"
    finally:
        await pooled.close()

    sdk_reply, our_reply, sdk_send, our_send = map(requests_alike, recorder.seen)
    assert our_reply == sdk_reply
    assert our_send == sdk_send
    assert sdk_reply[1].endswith("/activities/id%2Fwith%20space")
    assert (sdk_reply[2]["Authorization"] == f"Bearer {TOKEN}") is bool(app_id)


async def test_a_refused_reply_raises_with_the_status(recorder: RecordingChannel) -> None:
    recorder.status = 503
    auth = PooledAuthentication(ConfigurationBotFrameworkAuthentication(settings()))
    try:
        client = await auth.create_connector_factory(ClaimsIdentity({}, True)).create(recorder.url, None)
        with pytest.raises(ChannelError) as raised:
            await client.conversations.send_to_conversation("call-1", message(recorder.url))
    finally:
        await auth.close()
    assert raised.value.status == 503 and "503" in str(raised.value)
