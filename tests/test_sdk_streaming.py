"""botbuilder-python 4.17.1's streaming stack, defect by defect: why adapters/framing.py,
adapters/streaming.py and adapters/socket_api.py replace it (docs/streaming.md).

Each SDK test reproduces one defect against the installed SDK, in process, and asserts the
defective behaviour, so it FAILS when a botbuilder release fixes or changes the defect.
When one fails, read the new release: the SDK's stack may now survive a real call (try it
with tests/test_streaming.py's JS channel), or our workaround may rest on something that
moved. The last test shows our own framing getting right what the SDK's gets wrong.

Paths are under site-packages; line numbers are 4.17.1's.
"""

from __future__ import annotations

import asyncio
import json
import types
import uuid
from collections.abc import Iterable
from typing import Any

import pytest
from aiohttp import WSMessage, WSMsgType
from aiohttp.http_websocket import WS_CLOSED_MESSAGE, WS_CLOSING_MESSAGE
from botbuilder.integration.aiohttp import ConfigurationBotFrameworkAuthentication
from botbuilder.integration.aiohttp.streaming import AiohttpWebSocket
from botbuilder.schema import Activity, ActivityTypes, ConversationAccount, ResourceResponse
from botframework.streaming import ReceiveResponse, StreamingRequest, StreamingResponse
from botframework.streaming.payload_transport import PayloadReceiver, PayloadSender
from botframework.streaming.payloads import (
    ContentStream,
    PayloadAssemblerManager,
    SendOperations,
    StreamManager,
)
from botframework.streaming.payloads.assemblers import ReceiveResponseAssembler
from botframework.streaming.payloads.models import Header as SdkHeader
from botframework.streaming.payloads.models import PayloadTypes
from botframework.streaming.transport.web_socket import WebSocketTransport

from adapters.framing import Deframer, Header, PayloadType, Request, Response, encode, new_id

HEADER_BYTES = 48


class AiohttpSocketStub:
    """What the SDK's ``AiohttpWebSocket`` uses of an aiohttp WebSocket. It hands out the
    given messages, then reads as closed (one given none stays open to send on), and keeps
    what is sent; ``stream_sent`` is set once a stream's last payload has gone out."""

    def __init__(self, messages: Iterable[WSMessage] = ()) -> None:
        self.messages = list(messages)
        self._reads = bool(self.messages)
        self.sent: list[bytes] = []
        self.stream_sent = asyncio.Event()
        self._header: Header | None = None  # sent, its payload not yet

    @property
    def closed(self) -> bool:
        return self._reads and not self.messages

    async def receive(self) -> WSMessage:
        await asyncio.sleep(0)  # as a socket does between messages: other tasks run
        return self.messages.pop(0) if self.messages else WS_CLOSED_MESSAGE

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)
        header, self._header = self._header, None
        if header is None:
            header = Header.parse(data)
            if header.length:
                self._header = header
                return
        if header.type is PayloadType.STREAM and header.end:
            self.stream_sent.set()


def binary(*messages: bytes) -> list[WSMessage]:
    return [WSMessage(WSMsgType.BINARY, message, None) for message in messages]


def sdk_sender() -> tuple[PayloadSender, AiohttpSocketStub]:
    """The SDK's send path as CloudAdapter builds it, down to a stub aiohttp socket."""
    socket = AiohttpSocketStub()
    sender = PayloadSender()
    sender.connect(WebSocketTransport(AiohttpWebSocket(socket)))
    return sender, socket


def payloads(sent: list[bytes]) -> list[tuple[Header, bytes]]:
    """What the SDK sent, as (header, payload): it writes each as a message of its own."""
    out: list[tuple[Header, bytes]] = []
    index = 0
    while index < len(sent):
        header = Header.parse(sent[index])
        payload = sent[index + 1] if header.length else b""
        out.append((header, payload))
        index += 2 if header.length else 1
    return out


async def test_sdk_cannot_read_a_response_whose_stream_id_is_a_guid() -> None:
    """Defect: the response assembler reads a stream id as an integer,
    ``UUID(int=int(stream_description.id))``
    (botframework/streaming/payloads/assemblers/receive_response_assembler.py:67), while
    every peer (.NET, JS, and the SDK's own senders, payload_disassembler.py:49) writes a
    GUID. So the channel's answer to a bot's send is never read: the ValueError is raised
    in a task nobody awaits (line 52), the send's future is never resolved and the turn
    waits forever. The request assembler reads ``UUID(id)`` and is right.

    Ours: adapters/framing.py reads stream ids as GUIDs for requests and responses alike.
    This fails when the SDK reads a GUID stream id in a response."""
    answer = Response(new_id(), 200, b'{"id":"reply-1"}', "application/json")
    head = encode(answer)[1]  # the response's JSON header payload, as any peer sends it
    stream_id = json.loads(head)["streams"][0]["id"]
    uuid.UUID(stream_id)  # a GUID
    header = SdkHeader(type=PayloadTypes.RESPONSE, id=uuid.UUID(answer.id), end=True)
    header.payload_length = len(head)
    completed: list[Any] = []

    async def on_completed(identifier: uuid.UUID, response: Any) -> None:
        completed.append(response)

    assembler = ReceiveResponseAssembler(header, StreamManager(), on_completed)
    with pytest.raises(ValueError, match=f"Stream description id '{stream_id}' is not a Guid"):
        await assembler.process_response(list(head))
    assert completed == []


@pytest.mark.parametrize(
    "message",
    [WS_CLOSING_MESSAGE, WS_CLOSED_MESSAGE, WSMessage(WSMsgType.ERROR, ConnectionResetError(), None)],
    ids=["closing", "closed", "error"],
)
async def test_sdk_raises_on_aiohttps_own_message_types(message: WSMessage) -> None:
    """Defect: ``WebSocketMessageType(int(message.type))``
    (botbuilder/integration/aiohttp/streaming/aiohttp_web_socket.py:54) knows only the
    WebSocket opcodes; aiohttp's receive() also returns CLOSING (256), CLOSED (257) and
    ERROR (258), so a socket going away surfaces in the SDK's read loop as a ValueError
    (and a printed traceback), not as a close.

    Ours: adapters/streaming.py reads with ``async for`` (which ends on CLOSE, CLOSING and
    CLOSED) and acts on BINARY and TEXT only. This fails when the SDK maps aiohttp's own
    types."""
    socket = AiohttpWebSocket(AiohttpSocketStub([message]))
    with pytest.raises(ValueError, match=f"^{int(message.type)} is not a valid WebSocketMessageType$"):
        await socket.receive()


async def test_sdk_loses_a_payload_merged_with_its_header() -> None:
    """Defect: ``WebSocketTransport.receive(buffer, offset, count)``
    (botframework/streaming/transport/web_socket/web_socket_transport.py:50-54) reads one
    WebSocket message per call and copies ``count`` bytes of it, dropping the rest. The
    SDK's reader asks for a 48-byte header, then for its payload
    (payload_transport/payload_receiver.py:100, :137), so a header and its payload in one
    message, as .NET sends them, lose the payload: the next message is read in its place.

    Ours: adapters/framing.Deframer reads the socket as a byte stream (see the last test).
    This fails when the SDK's transport keeps what a message holds past ``count``."""
    body = json.dumps({"type": "message", "text": "hello there " * 20}).encode()
    frames = encode(Request(new_id(), "POST", "/api/messages", body, "application/json"))
    request_header, request_head, stream_header, stream_body = frames
    socket = AiohttpSocketStub(binary(request_header + request_head, stream_header + stream_body))
    transport = WebSocketTransport(AiohttpWebSocket(socket))

    header: list[Any] = [None] * HEADER_BYTES  # the SDK reads into lists of ints
    assert await transport.receive(header, 0, HEADER_BYTES) == HEADER_BYTES
    assert bytes(header) == request_header
    payload: list[Any] = [None] * len(request_head)
    assert await transport.receive(payload, 0, len(payload)) == len(payload)
    assert bytes(payload) != request_head
    assert bytes(payload) == (stream_header + stream_body)[: len(payload)]  # the next message
    assert socket.messages == []  # the request's JSON is gone


async def test_sdk_raises_on_a_header_split_across_messages() -> None:
    """The same defect the other way (web_socket_transport.py:52-54): a header cut across
    two messages raises IndexError, since one message is copied as if it held ``count``
    bytes. This fails when the SDK's transport reads across messages."""
    request_header = encode(Request(new_id(), "GET", "/api/version"))[0]
    socket = AiohttpSocketStub(binary(request_header[:20], request_header[20:]))
    transport = WebSocketTransport(AiohttpWebSocket(socket))
    with pytest.raises(IndexError):
        await transport.receive([None] * HEADER_BYTES, 0, HEADER_BYTES)


async def test_sdk_resends_a_bodys_start_for_every_4096_byte_chunk() -> None:
    """Defect: each chunk of a body over 4096 bytes is copied from the stream's start.
    The disassembler hands the sender the whole stream with each chunk's header
    (botframework/streaming/payloads/disassemblers/payload_disassembler.py:101), and the
    sender copies ``packet.payload[index]`` from index 0 (payload_transport/
    payload_sender.py:140). So a reply over 4 KB (a handoff with its transcript) reaches
    the channel with its first 4096 bytes repeated in place of the rest.

    Ours: adapters/framing.encode sends chunk n as ``body[n*4096:(n+1)*4096]``. This fails
    when the SDK sends each chunk from its own offset."""
    sender, socket = sdk_sender()
    activity = Activity(
        type=ActivityTypes.message,
        text=" ".join(f"word{n}" for n in range(1500)),
        conversation=ConversationAccount(id="call-1"),
    )
    request = StreamingRequest.create_post("/v3/conversations/call-1/activities")
    request.set_body(activity)  # as StreamingRequestHandler.send_activity does (line 176)
    body = bytes(request.streams[0].content)
    assert len(body) > 2 * 4096

    await SendOperations(sender).send_request(uuid.uuid4(), request)
    async with asyncio.timeout(5):
        await socket.stream_sent.wait()
    chunks = [payload for header, payload in payloads(socket.sent) if header.type is PayloadType.STREAM]
    sizes = [min(4096, len(body) - offset) for offset in range(0, len(body), 4096)]
    assert [len(chunk) for chunk in chunks] == sizes  # the right sizes and end flags...
    assert chunks == [body[:size] for size in sizes]  # ...each from the body's start
    assert b"".join(chunks) != body


async def test_sdk_declares_a_bodys_length_in_characters() -> None:
    """Defect: a stream's declared length is ``len()`` of the decoded text
    (botframework/streaming/payloads/disassemblers/payload_disassembler.py:61), characters,
    not bytes: a non-ASCII body (a StreamingResponse's ``set_body(str)``, e.g. the error
    text StreamingRequestHandler answers with) declares fewer bytes than it sends.

    Ours: adapters/framing.encode declares ``len(body)`` of the bytes. This fails when the
    SDK declares the body's length in bytes."""
    sender, socket = sdk_sender()
    text = json.dumps({"error": "la llamada falló: número no válido"}, ensure_ascii=False)
    response = StreamingResponse(status_code=500)
    response.set_body(text)
    body = text.encode()

    await SendOperations(sender).send_response(uuid.uuid4(), response)
    async with asyncio.timeout(5):
        await socket.stream_sent.wait()
    [head] = [payload for header, payload in payloads(socket.sent) if header.type is PayloadType.RESPONSE]
    [stream] = [payload for header, payload in payloads(socket.sent) if header.type is PayloadType.STREAM]
    assert stream == body
    assert json.loads(head)["streams"][0]["length"] == len(text) < len(body)


def test_sdk_cannot_read_a_received_responses_body() -> None:
    """Defect: ``ReceiveResponse.read_body`` calls ``bytes(content_stream.stream)``
    (botframework/streaming/receive_response.py:50) on a PayloadStream, which holds its
    data in buffers: TypeError. So even an answer that got past the stream-id defect could
    not be read: ``read_body_as_json(ResourceResponse)`` is how
    StreamingRequestHandler.send_activity reads a reply's id (line 191).

    Ours: a Response's body is bytes (adapters/framing.py). This fails when the SDK reads
    a received body."""
    assembler = StreamManager().get_payload_assembler(uuid.uuid4())
    content = ContentStream(assembler.identifier, assembler)
    body = b'{"id":"reply-1"}'
    content.stream.give_buffer(list(body))
    assembler.content_length = len(body)
    response = ReceiveResponse(status_code=200, streams=[content])
    with pytest.raises(TypeError, match="cannot convert 'PayloadStream' object to bytes"):
        response.read_body_as_json(ResourceResponse)


def test_sdk_cannot_answer_with_a_dict_body() -> None:
    """Defect: ``StreamingResponse.set_body`` takes a str, a Serializable or a Model and
    calls ``body.encode()`` on anything else (botframework/streaming/streaming_response.py:42);
    StreamingRequestHandler.process_request passes it an invoke response's body as is
    (botbuilder/core/streaming/streaming_request_handler.py:155), usually a dict.

    Ours: adapters/socket_api._framed answers with the JSON bytes of the HTTP answer. This
    fails when ``set_body`` takes a dict."""
    with pytest.raises(AttributeError, match="'dict' object has no attribute 'encode'"):
        StreamingResponse(status_code=200).set_body({"status": "ok"})


async def test_sdk_streaming_upgrade_demands_a_token_with_authentication_off() -> None:
    """Defect: with no MicrosoftAppId (authentication off), a POST without a token is
    taken, but the streaming path always validates the header
    (botframework/connector/auth/_built_in_bot_framework_authentication.py:123 ->
    jwt_token_validation.py:90): ValueError, not even the PermissionError that
    CloudAdapter.process turns into a 401, so the upgrade gets a 500.

    Ours: adapters/auth.py decides a token-less upgrade as it decides a POST (anonymous
    when off, 401 when on). This fails when the SDK takes a token-less upgrade with
    authentication off."""
    auth = ConfigurationBotFrameworkAuthentication(types.SimpleNamespace())  # an empty config
    posted = await auth.authenticate_request(Activity(channel_id="telephony"), "")
    assert posted.claims_identity.claims == {}  # anonymous: taken
    with pytest.raises(ValueError, match="argument auth_header is null"):
        await auth.authenticate_streaming_request(None, "telephony")


async def test_sdk_never_frees_a_finished_bodys_stream_assembler() -> None:
    """Defect: the stream manager keeps an assembler per body stream for the socket's life
    (botframework/streaming/payloads/stream_manager.py:18-23). One is removed only by
    ``close_stream`` (line 38), which only the assemblers' ``close()`` call, and nothing
    in the SDK calls those; the request assemblers, by contrast, are freed at their end
    (payload_assembler_manager.py:56). So every activity received leaves its body on a
    socket that carries calls for hours.

    Ours: adapters/framing.Deframer drops a stream once its message is whole (``open`` is
    0; see the last test). This fails when the SDK frees a stream once it is read."""
    stream_manager = StreamManager()
    bodies: asyncio.Queue[str] = asyncio.Queue()

    async def on_request(identifier: uuid.UUID, request: Any) -> None:
        await bodies.put(await request.read_body_as_str())

    async def on_response(identifier: uuid.UUID, response: Any) -> None:
        raise AssertionError("no responses are sent here")

    assemblers = PayloadAssemblerManager(stream_manager, on_request, on_response)
    receiver = PayloadReceiver()
    receiver.subscribe(assemblers.get_payload_stream, assemblers.on_receive)
    activities = [json.dumps({"type": "message", "text": f"turn {n}"}) for n in range(3)]
    frames = [
        frame
        for activity in activities
        for frame in encode(Request(new_id(), "POST", "/api/messages", activity.encode(), "application/json"))
    ]
    # Each header and each payload in a message of its own, which the SDK reads.
    await receiver.connect(WebSocketTransport(AiohttpWebSocket(AiohttpSocketStub(binary(*frames)))))
    async with asyncio.timeout(5):
        received = [await bodies.get() for _ in activities]

    assert received == activities  # every body read to its end
    assert assemblers._active_assemblers == {}
    kept = stream_manager._active_assemblers
    assert len(kept) == len(activities)
    assert all(assembler.end for assembler in kept.values())


def test_our_framing_gets_right_what_the_sdk_gets_wrong() -> None:
    """A body over 4096 bytes, non-ASCII, declared in bytes and sent chunk by chunk from
    its own offsets (the SDK: repeated start, length in characters); a response whose body
    stream has a GUID id (the SDK: unreadable); all of it merged into one WebSocket
    message, and cut into single bytes (the SDK: bytes lost, or IndexError): every message
    comes back whole, and nothing is left held (the SDK: assemblers kept)."""
    body = json.dumps({"type": "message", "text": "¿Sí? Añadir € " * 600}, ensure_ascii=False).encode()
    assert len(body) > 2 * 4096 and len(body) > len(body.decode())
    request = Request(new_id(), "POST", "/v3/conversations/call-1/activities", body, "application/json")
    answer = Response(new_id(), 200, b'{"id":"reply-1"}', "application/json")
    request_frames, answer_frames = encode(request), encode(answer)

    assert json.loads(request_frames[1])["streams"][0]["length"] == len(body)
    chunks = request_frames[3::2]
    assert len(chunks) == 3 and b"".join(chunks) == body
    uuid.UUID(json.loads(answer_frames[1])["streams"][0]["id"])

    wire = b"".join(request_frames + answer_frames)
    for messages in ([wire], [wire[n : n + 1] for n in range(len(wire))]):
        deframer = Deframer()
        received = [item for message in messages for item in deframer.feed(message)]
        assert received == [request, answer]
        assert deframer.open == 0
