"""The Bot Framework streaming protocol's wire format: headers, payloads and whole messages.

What the Telephony channel and the bot exchange over the WebSocket, with no I/O here.
Every payload is a 48-byte ASCII header, ``T.LLLLLL.<GUID>.E\\n`` (type, payload length,
id, end flag), then the payload. A request or response is a JSON header payload naming
its body streams; each body follows as stream payloads under the stream's own id, in
chunks of at most 4096 bytes.

The socket is read as a byte stream: a WebSocket message may hold several payloads or a
part of one (botbuilder-python 4.17.1 assumes one message per header and per chunk, and
loses bytes otherwise). Every size is bounded, so a peer that lies about a length or
never ends a stream costs a bounded amount of memory and gets a ``FramingError``.
A header may announce any length the format allows (.NET sends a request's JSON in
one piece over 4096 bytes), though no payload may pass the body limit; headers written
here carry 4096 at most, which every SDK reads.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

HEADER_BYTES = 48
MAX_CHUNK = 4096  # the most one header of ours carries (botframework-streaming refuses more)
MAX_BODY_BYTES = 256 * 1024  # as over HTTP: an activity is a few KB
MAX_OPEN = 1024  # messages and streams being assembled at once on one socket
MAX_HELD_BYTES = 4 * MAX_BODY_BYTES  # bytes of them held at once on one socket
CONTENT_TYPE = "application/json; charset=utf-8"


# As .NET's Guid.TryParse and JS's check read an id: hyphens in their places, nothing else.
_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _guid(text: str) -> str:
    if not _GUID.fullmatch(text):
        raise ValueError(f"{text!r} is not a GUID")
    return text.lower()


class PayloadType(StrEnum):
    REQUEST = "A"
    RESPONSE = "B"
    STREAM = "S"
    CANCEL_ALL = "X"
    CANCEL_STREAM = "C"


class FramingError(ValueError):
    """The peer broke the protocol; the connection cannot be trusted any further."""


@dataclass(slots=True, frozen=True)
class Header:
    type: PayloadType
    length: int
    id: str
    end: bool

    def encode(self) -> bytes:
        return f"{self.type}.{self.length:06d}.{self.id}.{int(self.end)}\n".encode("ascii")

    @classmethod
    def parse(cls, raw: bytes) -> Header:
        try:
            text = raw.decode("ascii")
            kind, length, ident, end = text[0], text[2:8], text[9:45], text[46:]
            if text[1] != "." or text[8] != "." or text[45] != "." or end not in ("0\n", "1\n"):
                raise ValueError("delimiters")
            header = cls(PayloadType(kind), int(length), _guid(ident), end == "1\n")
        except (ValueError, IndexError) as e:
            raise FramingError(f"malformed header {raw[:HEADER_BYTES]!r}") from e
        if not length.isdigit():  # int() took a sign or spaces
            raise FramingError(f"header length {length!r} is not six digits")
        return header


@dataclass(slots=True)
class Request:
    """A request either side sends: an activity to ``/api/messages``, a reply to the channel."""

    id: str
    verb: str
    path: str
    body: bytes | None = None
    content_type: str = ""


@dataclass(slots=True)
class Response:
    id: str
    status: int
    body: bytes | None = None
    content_type: str = ""

    def json(self) -> Any:
        """The body as JSON; None when there is none or it is not JSON."""
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def new_id() -> str:
    return str(uuid.uuid4())


def encode(message: Request | Response) -> list[bytes]:
    """The WebSocket messages that carry ``message``: each header, then its payload, as
    separate messages (the framing every Bot Framework SDK reads)."""
    streams: list[dict[str, Any]] = []
    stream_id = new_id()
    if message.body is not None:
        streams.append(
            {"id": stream_id, "type": message.content_type or CONTENT_TYPE, "length": len(message.body)}
        )
    if isinstance(message, Request):
        head: dict[str, Any] = {"verb": message.verb, "path": message.path, "streams": streams}
        kind = PayloadType.REQUEST
    else:
        head = {"statusCode": message.status, "streams": streams}
        kind = PayloadType.RESPONSE
    out = _chunks(kind, message.id, json.dumps(head, separators=(",", ":")).encode())
    if message.body:  # an empty body has no stream payloads, as the SDKs send it
        out += _chunks(PayloadType.STREAM, stream_id, message.body)
    return out


def _chunks(kind: PayloadType, ident: str, data: bytes) -> list[bytes]:
    out: list[bytes] = []
    for start in range(0, max(len(data), 1), MAX_CHUNK):
        chunk = data[start : start + MAX_CHUNK]
        out += [Header(kind, len(chunk), ident, start + MAX_CHUNK >= len(data)).encode(), chunk]
    return out


@dataclass(slots=True)
class _Stream:
    data: bytearray = field(default_factory=bytearray)
    length: int | None = None  # as declared by the message that names it
    ended: bool = False

    @property
    def complete(self) -> bool:
        return self.ended or self.length == 0 or (self.length is not None and len(self.data) >= self.length)


@dataclass(slots=True)
class _Pending:
    """A request or response whose header payload has arrived, waiting for its streams."""

    message: Request | Response
    streams: list[tuple[str, str]]  # (stream id, content type)


class Deframer:
    """Turns the bytes of a socket, cut anywhere, into whole requests and responses."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header: Header | None = None
        self._heads: dict[str, bytearray] = {}  # message id -> header payload so far
        self._streams: dict[str, _Stream] = {}
        self._pending: dict[str, _Pending] = {}  # keyed by stream id (each stream's message)
        self.cancelled = 0  # cancel payloads received (answered by dropping what they name)
        self._held = 0  # bytes of unfinished messages and streams

    @property
    def open(self) -> int:
        """Messages and streams being assembled (none once every message is whole)."""
        return len(self._heads) + len(self._streams)

    def feed(self, data: bytes) -> list[Request | Response]:
        """Consume ``data``; the messages it completes, in order."""
        self._buffer += data
        done: list[Request | Response] = []
        while True:
            if self._header is None:
                if len(self._buffer) < HEADER_BYTES:
                    return done
                self._header = Header.parse(bytes(self._buffer[:HEADER_BYTES]))
                del self._buffer[:HEADER_BYTES]
                if self._header.length > MAX_BODY_BYTES:
                    raise FramingError(f"a payload of {self._header.length} bytes; at most {MAX_BODY_BYTES}")
            header = self._header
            if len(self._buffer) < header.length:
                return done
            payload = bytes(self._buffer[: header.length])
            del self._buffer[: header.length]
            self._header = None
            done += self._payload(header, payload)

    def _hold(self, count: int) -> None:
        self._held += count
        if self._held > MAX_HELD_BYTES:
            raise FramingError(f"over {MAX_HELD_BYTES} bytes of unfinished messages")

    def _payload(self, header: Header, payload: bytes) -> list[Request | Response]:
        if header.type in (PayloadType.STREAM, PayloadType.REQUEST, PayloadType.RESPONSE):
            self._hold(len(payload))
        if header.type is PayloadType.STREAM:
            if (
                not payload
                and header.end
                and header.id not in self._streams
                and header.id not in self._pending
            ):
                # .NET ends an empty body with an empty payload after the message, which its
                # declared length 0 already completed: nothing is left to end.
                return []
            stream = self._stream(header.id)
            stream.data += payload
            if len(stream.data) > MAX_BODY_BYTES:
                raise FramingError(f"a body is over {MAX_BODY_BYTES} bytes")
            stream.ended = stream.ended or header.end
            pending = self._pending.get(header.id)
            return self._finish(pending) if pending else []
        if header.type is PayloadType.CANCEL_STREAM:
            self.cancelled += 1
            self._drop(header.id)
            pending = self._pending.pop(header.id, None)
            if pending:  # a message whose body was withdrawn: nothing to deliver
                for stream_id, _ in pending.streams:
                    self._pending.pop(stream_id, None)
                    self._drop(stream_id)
            return []
        if header.type is PayloadType.CANCEL_ALL:
            self.cancelled += 1
            return []
        head = self._heads.setdefault(header.id, bytearray())
        if len(self._heads) + len(self._streams) > MAX_OPEN:
            raise FramingError(f"over {MAX_OPEN} messages open at once")
        head += payload
        if len(head) > MAX_BODY_BYTES:
            raise FramingError(f"a {header.type.name.lower()} header payload is over {MAX_BODY_BYTES} bytes")
        if not header.end:
            return []
        del self._heads[header.id]
        self._held -= len(head)
        return self._start(header, bytes(head))

    def _drop(self, stream_id: str) -> bytes:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return b""
        self._held -= len(stream.data)
        return bytes(stream.data)

    def _stream(self, stream_id: str) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            if len(self._heads) + len(self._streams) >= MAX_OPEN:
                raise FramingError(f"over {MAX_OPEN} messages open at once")
            stream = self._streams[stream_id] = _Stream()
        return stream

    def _start(self, header: Header, raw: bytes) -> list[Request | Response]:
        try:
            head = json.loads(raw.decode("utf-8-sig"))
            if not isinstance(head, dict):
                raise ValueError("not an object")
            described = head.get("streams") or []
            if not isinstance(described, list) or not all(isinstance(s, dict) for s in described):
                raise ValueError("'streams' is not a list of objects")
            streams = [
                (_guid(str(s["id"])), str(s.get("type") or s.get("contentType") or "")) for s in described
            ]
            message: Request | Response
            if header.type is PayloadType.REQUEST:
                message = Request(header.id, str(head.get("verb") or ""), str(head.get("path") or ""))
            else:
                message = Response(header.id, int(head.get("statusCode") or 0))
        except (ValueError, KeyError, TypeError, ArithmeticError, RecursionError) as e:
            # ArithmeticError: int() of an Infinity status; RecursionError: deep nesting.
            raise FramingError(f"malformed {header.type.name.lower()} payload: {e!r:.200}") from e
        if len({stream_id for stream_id, _ in streams}) < len(streams) or any(
            stream_id in self._pending for stream_id, _ in streams
        ):
            raise FramingError("a body stream is named twice")
        if not streams:
            return [message]
        pending = _Pending(message, streams)
        for (stream_id, _), description in zip(streams, described, strict=True):
            length = description.get("length")
            stream = self._stream(stream_id)
            stream.length = length if isinstance(length, int) and 0 <= length <= MAX_BODY_BYTES else None
            self._pending[stream_id] = pending
        return self._finish(pending)

    def _finish(self, pending: _Pending) -> list[Request | Response]:
        """The message, if every one of its streams is complete (its first body is the body)."""
        if not all(self._streams[stream_id].complete for stream_id, _ in pending.streams):
            return []
        bodies = []
        for stream_id, content_type in pending.streams:
            self._pending.pop(stream_id, None)
            bodies.append((self._drop(stream_id), content_type))
        pending.message.body, pending.message.content_type = bodies[0]
        return [pending.message]
