"""Replies to the channel through one pooled aiohttp session, not a new SDK client per activity.

botbuilder 4.17.1's ``CloudAdapter`` builds, for every activity it processes or sends
proactively, a new msrest ``ConnectorClient`` and a new ``UserTokenClient``. Each one's
configuration spends milliseconds in ``ClientRetryPolicy.__init__`` (membership tests
against a long list), and every reply is posted with ``requests`` on a worker thread over
a new TCP connection: most of a stock bot's CPU per turn (``bench/turns.py`` compares).

``PooledAuthentication`` wraps the SDK's ``BotFrameworkAuthentication`` (which still
authenticates every request) and changes only where outbound clients come from:

- a connector client is made by the SDK once per (app id, service URL, audience) and kept;
- the two operations the adapter sends with, ``reply_to_activity`` and
  ``send_to_conversation``, are posted through one keep-alive aiohttp session, with the
  URL, headers and JSON body the SDK's own client would send; every other Connector
  operation goes to the SDK's client unchanged;
- a user-token client (OAuth sign-in, which the Telephony channel never uses) is made
  once per app id.

A call the channel carries on a streaming socket has a ``serviceUrl`` that is not
http(s) (``urn:botframework:...``): its replies, in a turn or proactive, go over the
socket (``SocketConnectorClient``, through ``adapters.connections``), whichever instance
holds it. ``tests/test_channel_client.py`` fails if an SDK upgrade makes this unneeded
(the stock adapter stops building clients per activity) or wrong (the stock client's
request differs from ours).
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urljoin

import aiohttp
from botbuilder.schema import Activity, ResourceResponse
from botframework.connector.auth import (
    AuthenticateRequestResult,
    AuthenticationConstants,
    BotFrameworkAuthentication,
    ClaimsIdentity,
    ConnectorFactory,
    UserTokenClient,
)
from botframework.connector.skills import BotFrameworkClient
from yarl import URL

from adapters.activity_json import to_json
from adapters.framing import CONTENT_TYPE, Request, new_id

if TYPE_CHECKING:
    from adapters.connections import Connections

CLIENTS_MAX = 256  # service URLs a bot hears from: one or two per region
POST_TIMEOUT = aiohttp.ClientTimeout(total=10, sock_connect=3)  # inside a turn's 12 s


def is_streaming(service_url: str | None) -> bool:
    """Whether replies to this ``serviceUrl`` go over a streaming socket: streaming channels
    name theirs with a URN (``urn:botframework:...``), never http(s)."""
    return not (service_url or "").lower().startswith(("http://", "https://"))


class ChannelError(Exception):
    """The channel refused a reply (status and the start of its body)."""

    def __init__(self, status: int, url: str, body: str) -> None:
        super().__init__(f"channel answered {status} to POST {url}: {body[:200]}")
        self.status = status


class PooledAuthentication(BotFrameworkAuthentication):  # type: ignore[misc]
    """The SDK's authentication, with connector clients kept and replies posted over one session."""

    def __init__(self, inner: BotFrameworkAuthentication) -> None:
        self.inner = inner
        self._clients: OrderedDict[tuple[str, str, str], PooledConnectorClient] = OrderedDict()
        self._token_clients: dict[str, UserTokenClient] = {}
        self._session: aiohttp.ClientSession | None = None
        self.sockets: Connections | None = None  # set by the app: how streaming calls are reached

    @property
    def session(self) -> aiohttp.ClientSession:
        """The one session replies go through (made on first use, inside the event loop)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300), timeout=POST_TIMEOUT
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def authenticate_request(self, activity: Activity, auth_header: str) -> AuthenticateRequestResult:
        result = await self.inner.authenticate_request(activity, auth_header)
        if result.connector_factory is not None:
            result.connector_factory = _PooledFactory(
                self, result.connector_factory, _app_id(result.claims_identity)
            )
        return result

    async def authenticate_streaming_request(
        self, auth_header: str, channel_id_header: str
    ) -> AuthenticateRequestResult:
        result = await self.inner.authenticate_streaming_request(auth_header, channel_id_header)
        # Every turn on the socket sends through the same factory as a proactive send.
        result.connector_factory = self.create_connector_factory(result.claims_identity)
        return result

    def create_connector_factory(self, claims_identity: ClaimsIdentity) -> ConnectorFactory:
        """The proactive path (``continue_conversation``): the scheduler's prompts."""
        inner = self.inner.create_connector_factory(claims_identity)
        return _PooledFactory(self, inner, _app_id(claims_identity))

    async def create_user_token_client(self, claims_identity: ClaimsIdentity) -> UserTokenClient:
        app_id = _app_id(claims_identity)
        client = self._token_clients.get(app_id)
        if client is None:
            client = await self.inner.create_user_token_client(claims_identity)
            self._token_clients[app_id] = client
        return client

    def create_bot_framework_client(self) -> BotFrameworkClient:
        return self.inner.create_bot_framework_client()

    def get_originating_audience(self) -> str:
        return str(self.inner.get_originating_audience())

    async def authenticate_channel_request(self, auth_header: str) -> ClaimsIdentity:
        return await self.inner.authenticate_channel_request(auth_header)

    async def _client(
        self, key: tuple[str, str, str], make: ConnectorFactory, service_url: str, audience: str | None
    ) -> PooledConnectorClient:
        client = self._clients.get(key)
        if client is None:
            sdk_client = await make.create(service_url, audience)
            client = PooledConnectorClient(sdk_client, self)
            self._clients[key] = client
            if len(self._clients) > CLIENTS_MAX:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(key)
        return client


def _app_id(identity: ClaimsIdentity | None) -> str:
    """The bot's app id in a request's claims, as the SDK reads it ('' when auth is off)."""
    if identity is None:
        return ""
    value = identity.get_claim_value(AuthenticationConstants.AUDIENCE_CLAIM)
    if value is None:
        value = identity.get_claim_value(AuthenticationConstants.APP_ID_CLAIM)
    return str(value or "")


class _PooledFactory(ConnectorFactory):  # type: ignore[misc]
    def __init__(self, owner: PooledAuthentication, inner: ConnectorFactory, app_id: str) -> None:
        self._owner, self._inner, self._app_id = owner, inner, app_id

    async def create(
        self, service_url: str, audience: str | None = None
    ) -> PooledConnectorClient | SocketConnectorClient:
        if is_streaming(service_url):
            if self._owner.sockets is None:
                raise ChannelError(0, service_url, "this bot takes no streaming connections")
            return SocketConnectorClient(self._owner.sockets)
        key = (self._app_id, service_url, audience or "")
        return await self._owner._client(key, self._inner, service_url, audience)


class PooledConnectorClient:
    """An SDK ``ConnectorClient`` whose sends go through the shared session."""

    def __init__(self, sdk_client: Any, owner: PooledAuthentication) -> None:
        self.sdk_client = sdk_client
        self.config = sdk_client.config
        self.conversations = _Conversations(self, sdk_client.conversations)
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sdk_client, name)

    async def post(self, path: str, activity: Activity, **extra_headers: str) -> ResourceResponse:
        """POST ``activity`` as the SDK's ``ConversationsOperations`` does."""
        config = self.config
        url = urljoin(config.base_url.rstrip("/") + "/", path)
        headers = {
            "Accept": "application/json",
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": config.user_agent,
            **extra_headers,
        }
        token = await self._token(config.credentials)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        body = json.dumps(to_json(activity)).encode()  # activity.serialize(), without msrest's cost
        # encoded=True: as quoted, byte for byte (yarl would turn %3A back into ':').
        target = URL(url, encoded=True)
        async with self._owner.session.post(target, data=body, headers=headers) as response:
            if response.status not in (200, 201, 202):
                raise ChannelError(response.status, url, await response.text(errors="replace"))
            data = await response.json(content_type=None) if response.content_length != 0 else None
        return ResourceResponse(id=data.get("id") if isinstance(data, dict) else None)

    @staticmethod
    async def _token(credentials: Any) -> str:
        """The channel token, as the SDK's ``AppCredentials.signed_session`` decides it: none
        without an app id. Fetching may block on the token endpoint, so off the loop."""
        app_id = getattr(credentials, "microsoft_app_id", None)
        if not app_id or app_id == AuthenticationConstants.ANONYMOUS_SKILL_APP_ID:
            return ""
        return str(await asyncio.to_thread(credentials.get_access_token))


class _Conversations:
    """``reply_to_activity`` and ``send_to_conversation`` pooled; the rest is the SDK's."""

    def __init__(self, client: PooledConnectorClient, sdk_operations: Any) -> None:
        self._client = client
        self._sdk = sdk_operations

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sdk, name)

    async def reply_to_activity(
        self, conversation_id: str, activity_id: str, activity: Activity, **_: Any
    ) -> ResourceResponse:
        path = f"v3/conversations/{quote(conversation_id, safe='')}/activities/{quote(activity_id, safe='')}"
        # As the SDK does, the conversation id rides along in a header on replies only.
        return await self._client.post(path, activity, **{"x-ms-conversation-id": conversation_id})

    async def send_to_conversation(
        self, conversation_id: str, activity: Activity, **_: Any
    ) -> ResourceResponse:
        path = f"v3/conversations/{quote(conversation_id, safe='')}/activities"
        return await self._client.post(path, activity)


class SocketConnectorClient:
    """A connector client whose sends go over the call's streaming socket, on this instance
    or, routed through Redis, on the one holding it; the channel's answer is read as the
    SDK's client would read an HTTP one."""

    def __init__(self, sockets: Connections) -> None:
        self.sockets = sockets
        self.conversations = self

    async def reply_to_activity(
        self, conversation_id: str, activity_id: str, activity: Activity, **_: Any
    ) -> ResourceResponse:
        path = f"/v3/conversations/{quote(conversation_id, safe='')}/activities/{quote(activity_id, safe='')}"
        return await self._post(conversation_id, path, activity)

    async def send_to_conversation(
        self, conversation_id: str, activity: Activity, **_: Any
    ) -> ResourceResponse:
        return await self._post(
            conversation_id, f"/v3/conversations/{quote(conversation_id, safe='')}/activities", activity
        )

    async def _post(self, conversation_id: str, path: str, activity: Activity) -> ResourceResponse:
        body = json.dumps(to_json(activity)).encode()
        response = await self.sockets.send(
            conversation_id, Request(new_id(), "POST", path, body, CONTENT_TYPE)
        )
        if not 200 <= response.status < 300:
            raise ChannelError(response.status, path, (response.body or b"").decode(errors="replace"))
        data = response.json()
        return ResourceResponse(id=data.get("id") if isinstance(data, dict) else None)
