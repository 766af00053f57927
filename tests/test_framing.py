"""adapters.framing on its own (no socket, no Redis): the streaming protocol's wire format.

The channel's socket is read as a byte stream that a peer may cut or merge anywhere, and
each peer frames and spells things its own way: .NET's new stack sends a request's JSON in
one payload over 4096 bytes and writes nulls, legacy .NET puts a BOM before JSON it chunks
at 4096, JS writes ``contentType`` in response stream descriptions and sends nothing for an
empty body. So: headers are strict, ``encode`` frames as every SDK reads, any cut of the
bytes gives back the same messages, every bound is a ``FramingError``, garbage is only ever
a ``FramingError``, and nothing is retained once a message is whole. The tests at the end
each found a bug in framing.py (an empty .NET body left a stream open forever, Infinity,
deep nesting and a stream named twice escaped as other errors, malformed GUIDs were read).
"""

from __future__ import annotations

import json
import random
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.framing import (
    CONTENT_TYPE,
    HEADER_BYTES,
    MAX_BODY_BYTES,
    MAX_CHUNK,
    MAX_HELD_BYTES,
    MAX_OPEN,
    Deframer,
    FramingError,
    Header,
    PayloadType,
    Request,
    Response,
    encode,
    new_id,
)

PROPERTY = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

GUID = "0f8fad5b-d9cb-469f-a165-70867728950e"
BOM = b"\xef\xbb\xbf"
VALID = f"A.000010.{GUID}.1\n".encode()
Message = Request | Response


# Helpers


def frame(kind: PayloadType | str, ident: str, payload: bytes = b"", *, end: bool = True) -> bytes:
    """One payload as a peer writes it: its 48-byte header, then its bytes."""
    return Header(PayloadType(kind), len(payload), ident, end).encode() + payload


def head(**fields: Any) -> bytes:
    """A request or response JSON payload, spelled exactly as given."""
    return json.dumps(fields).encode()


def described(stream_id: str, length: int | None, content_type: str | None = CONTENT_TYPE) -> dict[str, Any]:
    return {"id": stream_id, "type": content_type, "length": length}


def pairs(messages: list[bytes]) -> list[tuple[Header, bytes]]:
    """encode()'s WebSocket messages read back, checking each header is a message of its own
    and the next message is exactly its payload."""
    assert len(messages) % 2 == 0
    out = []
    for raw, payload in zip(messages[::2], messages[1::2], strict=True):
        assert len(raw) == HEADER_BYTES
        header = Header.parse(raw)
        assert len(payload) == header.length
        out.append((header, payload))
    return out


def retained(deframer: Deframer) -> dict[str, int]:
    """Everything a Deframer keeps between feeds, so "nothing retained" is asserted whole."""
    return {
        "open": deframer.open,
        "held": deframer._held,
        "pending": len(deframer._pending),
        "buffered": len(deframer._buffer),
        "mid-payload": int(deframer._header is not None),
    }


NOTHING = {"open": 0, "held": 0, "pending": 0, "buffered": 0, "mid-payload": 0}


def held_matches_contents(deframer: Deframer) -> bool:
    """The held-bytes bound is only sound if its count is what is actually held."""
    heads = sum(len(h) for h in deframer._heads.values())
    streams = sum(len(s.data) for s in deframer._streams.values())
    return deframer._held == heads + streams


def feed_cut(deframer: Deframer, data: bytes, cuts: list[int]) -> list[Message]:
    """Feed ``data`` in the pieces that ``cuts`` (offsets, any order, repeats allowed) make."""
    bounds = sorted({0, len(data), *cuts})
    out: list[Message] = []
    for start, stop in pairwise(bounds):
        out += deframer.feed(data[start:stop])
    return out


def draw_cuts(data: st.DataObject, wire: list[bytes]) -> list[int]:
    """Where the socket cuts the bytes: nowhere, at encode()'s own message boundaries (how
    legacy .NET and JS send), or anywhere, with a run of 1-byte pieces somewhere."""
    size = sum(len(m) for m in wire)
    mode = data.draw(st.sampled_from(["one piece", "as sent", "anywhere"]), label="cut")
    if mode == "one piece":
        return []
    if mode == "as sent":
        offsets, at = [], 0
        for message in wire:
            at += len(message)
            offsets.append(at)
        return offsets
    points = data.draw(st.lists(st.integers(0, size), max_size=40), label="points")
    start = data.draw(st.integers(0, size), label="run start")
    run = data.draw(st.integers(0, 200), label="run of 1-byte pieces")
    return points + list(range(start, min(size, start + run)))


def noise(size: int) -> bytes:
    """Bytes of any size from the size alone, so Hypothesis shrinks a size, not 20,000 bytes."""
    return random.Random(size).randbytes(size)


BODIES = st.one_of(
    st.none(),
    st.binary(max_size=64),
    st.sampled_from([0, 1, MAX_CHUNK - 1, MAX_CHUNK, MAX_CHUNK + 1, 2 * MAX_CHUNK, 20_000]).map(noise),
    st.integers(0, 20_000).map(noise),
)
CONTENT_TYPES = st.sampled_from(
    [CONTENT_TYPE, "text/plain; charset=utf-8", "application/octet-stream"]
) | st.text(min_size=1, max_size=40)
VERBS = st.sampled_from(["POST", "GET", "PUT", "DELETE"]) | st.text(max_size=10)
PATHS = st.sampled_from(["/api/messages", "/api/version", "/v3/conversations/a%3Ab/activities"]) | st.text(
    max_size=200
)


@st.composite
def messages(draw: st.DrawFn, bodies: st.SearchStrategy[bytes | None] = BODIES) -> Message:
    """A request or response that round-trips as it is: a body's content type is never empty
    (encode fills in the default) and a bodiless message has none."""
    body = draw(bodies)
    content_type = "" if body is None else draw(CONTENT_TYPES)
    ident = str(draw(st.uuids()))
    if draw(st.booleans()):
        return Request(ident, draw(VERBS), draw(PATHS), body, content_type)
    return Response(ident, draw(st.integers(0, 999)), body, content_type)


# Headers


@pytest.mark.parametrize("end", [False, True])
@pytest.mark.parametrize("kind", list(PayloadType))
def test_a_header_is_written_as_48_ascii_bytes_and_reads_back(kind: PayloadType, end: bool) -> None:
    header = Header(kind, 4096, GUID, end)
    raw = header.encode()
    assert raw == f"{kind}.004096.{GUID}.{int(end)}\n".encode()
    assert len(raw) == HEADER_BYTES
    assert Header.parse(raw) == header


@PROPERTY
@given(st.sampled_from(PayloadType), st.integers(0, 999_999), st.uuids(), st.booleans())
def test_every_six_digit_length_round_trips(kind: PayloadType, length: int, ident: Any, end: bool) -> None:
    header = Header(kind, length, str(ident), end)
    assert Header.parse(header.encode()) == header


def test_an_upper_case_guid_is_read_as_the_same_lower_case_id() -> None:
    """.NET and JS both accept either case; ids are compared after reading."""
    assert Header.parse(VALID.replace(GUID.encode(), GUID.upper().encode())).id == GUID


def spliced(at: int, text: bytes, base: bytes = VALID) -> bytes:
    """The valid header with ``text`` written over it at ``at``: still 48 bytes."""
    return base[:at] + text + base[at + len(text) :]


MALFORMED = {
    "type letter not a payload type": spliced(0, b"Z"),
    "type letter in lower case": spliced(0, b"a"),
    "type delimiter missing": spliced(1, b"-"),
    "length delimiter missing": spliced(8, b"-"),
    "id delimiter missing": spliced(45, b"-"),
    "length signed plus": spliced(2, b"+00010"),
    "length signed minus": spliced(2, b"-00010"),
    "length space-padded in front": spliced(2, b" 00010"),
    "length space-padded behind": spliced(2, b"00010 "),
    "length with an underscore": spliced(2, b"00_010"),
    "length with a letter": spliced(2, b"0000x0"),
    "length blank": spliced(2, b"      "),
    "GUID with a non-hex digit": spliced(9, b"g"),
    "GUID with a space for a hyphen": spliced(17, b" "),
    "GUID blank": spliced(9, b" " * 36),
    "GUID all hyphens": spliced(9, b"-" * 36),
    "end flag 2": spliced(46, b"2"),
    "end flag a letter": spliced(46, b"T"),
    "end flag not followed by a newline": spliced(47, b"\r"),
    "non-ASCII type": spliced(0, b"\xc1"),
    "non-ASCII digit in the length": spliced(4, b"\xb9"),
    "UTF-8 full-width digit in the length": spliced(2, "\uff10".encode()),
    "non-ASCII in the GUID": spliced(12, b"\xe9"),
    "non-ASCII end flag": spliced(46, b"\xb1"),
    "dots only": b"." * 47 + b"\n",
    "zero bytes": bytes(HEADER_BYTES),
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_header_is_a_framing_error(raw: bytes) -> None:
    assert len(raw) == HEADER_BYTES
    with pytest.raises(FramingError):
        Header.parse(raw)


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_header_on_the_socket_is_a_framing_error(raw: bytes) -> None:
    """The deframer must not read past a header it could not parse."""
    with pytest.raises(FramingError):
        Deframer().feed(raw + bytes(10))


@pytest.mark.parametrize("raw", [b"", VALID[:47], VALID + b"x"], ids=["empty", "47 bytes", "49 bytes"])
def test_a_header_of_the_wrong_size_is_a_framing_error(raw: bytes) -> None:
    with pytest.raises(FramingError):
        Header.parse(raw)


@PROPERTY
@given(st.binary(min_size=HEADER_BYTES, max_size=HEADER_BYTES))
def test_any_48_bytes_parse_or_raise_framing_error(raw: bytes) -> None:
    try:
        header = Header.parse(raw)
    except FramingError:
        return
    assert 0 <= header.length <= 999_999


def test_header_lengths_above_4096_are_read_since_dotnet_sends_them() -> None:
    assert Header.parse(spliced(2, b"010000")).length == 10_000
    assert Header.parse(spliced(2, b"999999")).length == 999_999


def test_a_payload_of_exactly_the_body_limit_in_one_header_is_read() -> None:
    stream_id = new_id()
    deframer = Deframer()
    assert deframer.feed(frame("S", stream_id, bytes(MAX_BODY_BYTES), end=False)) == []
    assert deframer.open == 1


@pytest.mark.parametrize("length", [MAX_BODY_BYTES + 1, 999_999])
@pytest.mark.parametrize("kind", list(PayloadType))
def test_a_header_length_over_the_body_limit_is_refused_before_its_payload(
    kind: PayloadType, length: int
) -> None:
    """A peer lying about a length must not make us buffer it first."""
    deframer = Deframer()
    with pytest.raises(FramingError, match="at most"):
        deframer.feed(Header(kind, length, GUID, True).encode())


def test_a_header_cut_in_the_middle_waits_for_the_rest() -> None:
    deframer = Deframer()
    wire = frame("B", GUID, head(statusCode=200, streams=[]))
    assert deframer.feed(wire[:20]) == []
    assert deframer.feed(wire[20:50]) == []
    assert deframer.feed(wire[50:]) == [Response(GUID, 200)]
    assert deframer.feed(b"") == []


# encode()


@pytest.mark.parametrize(
    "size", [1, MAX_CHUNK - 1, MAX_CHUNK, MAX_CHUNK + 1, 2 * MAX_CHUNK, 2 * MAX_CHUNK + 1, 20_000]
)
def test_encode_chunks_a_body_at_4096_with_the_end_flag_on_the_last_chunk_only(size: int) -> None:
    body = noise(size)
    message = Request(new_id(), "POST", "/api/messages", body, "text/plain")
    (head_header, head_payload), *chunks = pairs(encode(message))
    assert head_header == Header(PayloadType.REQUEST, len(head_payload), message.id, True)
    streams = json.loads(head_payload)["streams"]
    assert streams == [{"id": chunks[0][0].id, "type": "text/plain", "length": size}]
    assert [h.type for h, _ in chunks] == [PayloadType.STREAM] * (-(-size // MAX_CHUNK))
    assert all(h.id == streams[0]["id"] and 0 < h.length <= MAX_CHUNK for h, _ in chunks)
    assert [h.end for h, _ in chunks] == [False] * (len(chunks) - 1) + [True]
    assert b"".join(p for _, p in chunks) == body


def test_encode_writes_a_request_as_verb_path_and_streams() -> None:
    message = Request(GUID, "POST", "/v3/conversations/c/activities", b"{}")
    (header, payload), _ = pairs(encode(message))
    assert header.type is PayloadType.REQUEST
    fields = json.loads(payload)
    assert (fields["verb"], fields["path"]) == ("POST", "/v3/conversations/c/activities")
    assert fields["streams"][0]["type"] == CONTENT_TYPE  # no content type given: JSON


def test_encode_writes_a_response_as_status_code_and_streams() -> None:
    (header, payload), _ = pairs(encode(Response(GUID, 201, b'{"id":"1"}', CONTENT_TYPE)))
    assert header == Header(PayloadType.RESPONSE, len(payload), GUID, True)
    assert json.loads(payload)["statusCode"] == 201


@pytest.mark.parametrize("message", [Request(GUID, "POST", "/", b""), Response(GUID, 200, b"")])
def test_an_empty_body_is_described_with_length_0_and_sends_no_stream_payload(message: Message) -> None:
    """As the JS SDK sends it: a 0-length payload is never written."""
    ((header, payload),) = pairs(encode(message))
    assert header.end
    (stream,) = json.loads(payload)["streams"]
    assert stream["length"] == 0


@pytest.mark.parametrize("message", [Request(GUID, "GET", "/api/version"), Response(GUID, 202)])
def test_no_body_sends_no_streams(message: Message) -> None:
    ((_, payload),) = pairs(encode(message))
    assert json.loads(payload)["streams"] == []


def test_a_request_json_over_4096_bytes_goes_in_4096_byte_chunks_and_reads_back() -> None:
    """Our own headers never carry more than 4096 (the JS SDK refuses more)."""
    message = Request(GUID, "POST", "/" + "p" * 9000, b"body", "text/plain")
    framed = pairs(encode(message))
    heads = [h for h, _ in framed if h.type is PayloadType.REQUEST]
    assert len(heads) == 3
    assert [h.end for h in heads] == [False, False, True]
    assert all(h.length <= MAX_CHUNK for h, _ in framed)
    assert Deframer().feed(b"".join(encode(message))) == [message]


@PROPERTY
@given(messages())
def test_encode_never_puts_more_than_4096_bytes_under_one_header(message: Message) -> None:
    framed = pairs(encode(message))
    assert all(h.length <= MAX_CHUNK for h, _ in framed)
    for kind in (PayloadType.REQUEST, PayloadType.RESPONSE, PayloadType.STREAM):
        ends = [h.end for h, _ in framed if h.type is kind]
        assert ends in ([], [*[False] * (len(ends) - 1), True])


# Round trips


@PROPERTY
@given(st.lists(messages(), min_size=1, max_size=4), st.data())
def test_messages_cut_anywhere_come_back_the_same_and_in_order(
    sent: list[Message], data: st.DataObject
) -> None:
    wire = [piece for message in sent for piece in encode(message)]
    deframer = Deframer()
    assert feed_cut(deframer, b"".join(wire), draw_cuts(data, wire)) == sent
    assert retained(deframer) == NOTHING


@settings(PROPERTY, max_examples=50)
@given(st.lists(messages(st.none() | st.binary(max_size=600)), min_size=1, max_size=3))
def test_messages_fed_one_byte_at_a_time_come_back_the_same(sent: list[Message]) -> None:
    wire = b"".join(piece for message in sent for piece in encode(message))
    deframer = Deframer()
    assert feed_cut(deframer, wire, list(range(len(wire)))) == sent
    assert retained(deframer) == NOTHING


def test_a_three_chunk_body_fed_one_byte_at_a_time_comes_back_whole() -> None:
    message = Response(GUID, 200, noise(2 * MAX_CHUNK + 7), "audio/wav")
    wire = b"".join(encode(message))
    deframer = Deframer()
    out = [m for i in range(len(wire)) for m in deframer.feed(wire[i : i + 1])]
    assert out == [message]
    assert retained(deframer) == NOTHING


@PROPERTY
@given(st.lists(messages(), min_size=2, max_size=4, unique_by=lambda m: m.id), st.data())
def test_messages_interleaved_payload_by_payload_all_come_out_whole(
    sent: list[Message], data: st.DataObject
) -> None:
    """Two senders on one socket: each payload whole, payloads of different messages mixed."""
    queues = [[a + b for a, b in zip(wire[::2], wire[1::2], strict=True)] for wire in map(encode, sent)]
    merged: list[tuple[int, bytes]] = []
    while any(queues):
        which = data.draw(st.sampled_from([i for i, q in enumerate(queues) if q]), label="next sender")
        merged.append((which, queues[which].pop(0)))
    completed_at = {which: at for at, (which, _) in enumerate(merged)}
    expected = [sent[i] for i in sorted(completed_at, key=completed_at.__getitem__)]
    deframer = Deframer()
    wire = [payload for _, payload in merged]
    assert feed_cut(deframer, b"".join(wire), draw_cuts(data, wire)) == expected
    assert retained(deframer) == NOTHING


def test_a_body_of_exactly_the_limit_is_delivered() -> None:
    message = Request(GUID, "POST", "/api/messages", noise(MAX_BODY_BYTES), CONTENT_TYPE)
    deframer = Deframer()
    assert deframer.feed(b"".join(encode(message))) == [message]
    assert retained(deframer) == NOTHING


def test_ten_thousand_messages_through_one_deframer_leave_nothing_behind() -> None:
    deframer = Deframer()
    bodies: list[bytes | None] = [None, b"", b'{"type":"message"}', noise(MAX_CHUNK + 1)]
    received = 0
    for i in range(10_000):
        body = bodies[i % len(bodies)]
        message: Message = (
            Request(new_id(), "POST", "/api/messages", body, CONTENT_TYPE if body is not None else "")
            if i % 2
            else Response(new_id(), 200, body, CONTENT_TYPE if body is not None else "")
        )
        for piece in encode(message):
            for got in deframer.feed(piece):
                assert got == message
                received += 1
    assert received == 10_000
    assert retained(deframer) == NOTHING


def test_response_json_reads_a_json_body_and_nothing_else() -> None:
    assert Response(GUID, 200, b'{"id":"a"}').json() == {"id": "a"}
    assert Response(GUID, 200, b"not json").json() is None
    assert Response(GUID, 200, b"").json() is None
    assert Response(GUID, 200).json() is None


# Peers' spellings


def test_a_js_response_naming_its_stream_content_type_is_read() -> None:
    """JS writes ``contentType`` instead of ``type`` in response stream descriptions."""
    stream_id, body = new_id(), b'{"id":"1234"}'
    fields = head(
        statusCode=200, streams=[{"id": stream_id, "contentType": CONTENT_TYPE, "length": len(body)}]
    )
    out = Deframer().feed(frame("B", GUID, fields) + frame("S", stream_id, body))
    assert out == [Response(GUID, 200, body, CONTENT_TYPE)]


def test_a_dotnet_response_with_null_streams_has_no_body() -> None:
    """.NET's new stack writes nulls: its early 202 is ``{"statusCode":202,"streams":null}``."""
    deframer = Deframer()
    assert deframer.feed(frame("B", GUID, b'{"statusCode":202,"streams":null}')) == [Response(GUID, 202)]
    assert retained(deframer) == NOTHING


def test_a_dotnet_stream_description_with_null_type_and_length_ends_on_the_end_flag() -> None:
    stream_id = new_id()
    deframer = Deframer()
    fields = head(verb="POST", path="/", streams=[described(stream_id, None, None)])
    assert deframer.feed(frame("A", GUID, fields)) == []
    assert deframer.feed(frame("S", stream_id, b"abc", end=False)) == []
    assert deframer.feed(frame("S", stream_id, b"def")) == [Request(GUID, "POST", "/", b"abcdef", "")]
    assert retained(deframer) == NOTHING


def test_a_bom_before_the_json_is_skipped() -> None:
    fields = head(verb="POST", path="/api/messages", streams=None)
    assert Deframer().feed(frame("A", GUID, BOM + fields)) == [Request(GUID, "POST", "/api/messages")]


def test_legacy_dotnet_json_with_a_bom_chunked_at_4096_is_read() -> None:
    """Legacy .NET chunks every payload, JSON included, header and chunk as separate messages."""
    stream_id = new_id()
    raw = BOM + head(verb="POST", path="/" + "x" * 5000, streams=[described(stream_id, 2)])
    deframer = Deframer()
    out: list[Message] = []
    for start in range(0, len(raw), MAX_CHUNK):
        chunk = raw[start : start + MAX_CHUNK]
        header = Header(PayloadType.REQUEST, len(chunk), GUID, start + MAX_CHUNK >= len(raw))
        out += deframer.feed(header.encode()) + deframer.feed(chunk)
    out += deframer.feed(frame("S", stream_id, b"{}"))
    assert out == [Request(GUID, "POST", "/" + "x" * 5000, b"{}", CONTENT_TYPE)]
    assert retained(deframer) == NOTHING


def test_a_dotnet_request_json_of_10000_bytes_in_one_header_is_read() -> None:
    """.NET's new stack never chunks a request's JSON."""
    stream_id, body = new_id(), b'{"type":"message"}'
    fields: dict[str, Any] = {"verb": "POST", "path": "", "streams": [described(stream_id, len(body))]}
    fields["path"] = "/" + "a" * (10_000 - len(json.dumps(fields)) - 1)
    raw = json.dumps(fields).encode()
    assert len(raw) == 10_000
    wire = frame("A", GUID, raw) + frame("S", stream_id, body)
    assert wire[2:8] == b"010000"
    deframer = Deframer()
    assert deframer.feed(wire) == [Request(GUID, "POST", fields["path"], body, CONTENT_TYPE)]
    assert retained(deframer) == NOTHING


@pytest.mark.parametrize("how_much_first", ["all", "some"])
def test_streams_arriving_before_the_request_that_names_them_are_kept_for_it(how_much_first: str) -> None:
    stream_id, body = new_id(), noise(MAX_CHUNK + 10)
    first, rest = body[:MAX_CHUNK], body[MAX_CHUNK:]
    deframer = Deframer()
    assert deframer.feed(frame("S", stream_id, first, end=False)) == []
    if how_much_first == "all":
        assert deframer.feed(frame("S", stream_id, rest)) == []
    out = deframer.feed(
        frame("A", GUID, head(verb="POST", path="/", streams=[described(stream_id, len(body))]))
    )
    if how_much_first == "some":
        assert out == []
        out = deframer.feed(frame("S", stream_id, rest))
    assert out == [Request(GUID, "POST", "/", body, CONTENT_TYPE)]
    assert retained(deframer) == NOTHING


def test_a_declared_length_of_0_completes_without_any_stream_payload() -> None:
    """JS writes no payload at all for an empty body."""
    stream_id = new_id()
    deframer = Deframer()
    out = deframer.feed(frame("B", GUID, head(statusCode=200, streams=[described(stream_id, 0)])))
    assert out == [Response(GUID, 200, b"", CONTENT_TYPE)]
    assert retained(deframer) == NOTHING


def test_a_message_with_two_streams_waits_for_both_and_its_body_is_the_first() -> None:
    first, second = new_id(), new_id()
    fields = head(verb="POST", path="/", streams=[described(first, 2), described(second, 3, "image/png")])
    deframer = Deframer()
    assert deframer.feed(frame("A", GUID, fields) + frame("S", second, b"png")) == []
    assert deframer.feed(frame("S", first, b"{}")) == [Request(GUID, "POST", "/", b"{}", CONTENT_TYPE)]
    assert retained(deframer) == NOTHING


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[]",
        b'"text"',
        b"null",
        b'{"streams":{"id":1}}',
        b'{"streams":[1]}',
        b'{"streams":[{}]}',
    ],
    ids=["empty", "not JSON", "array", "string", "null", "streams object", "streams of ints", "stream no id"],
)
@pytest.mark.parametrize("kind", ["A", "B"])
def test_a_request_or_response_payload_that_is_not_a_message_is_a_framing_error(
    kind: str, payload: bytes
) -> None:
    with pytest.raises(FramingError, match="malformed"):
        Deframer().feed(frame(kind, GUID, payload))


@pytest.mark.parametrize(
    "fields",
    [
        {"statusCode": "OK"},
        {"statusCode": [200]},
        {"statusCode": float("nan")},
        {"streams": [{"id": "nope"}]},
    ],
    ids=["status text", "status a list", "status NaN", "stream id not a GUID"],
)
def test_a_response_with_a_bad_field_is_a_framing_error(fields: dict[str, Any]) -> None:
    with pytest.raises(FramingError, match="malformed"):
        Deframer().feed(frame("B", GUID, json.dumps(fields).encode()))


def test_invalid_utf8_json_is_a_framing_error() -> None:
    with pytest.raises(FramingError, match="malformed"):
        Deframer().feed(frame("A", GUID, b'{"verb":"\xff"}'))


# Bounds


def test_a_body_over_the_limit_is_a_framing_error() -> None:
    stream_id = new_id()
    deframer = Deframer()
    deframer.feed(frame("A", GUID, head(verb="POST", path="/", streams=[described(stream_id, None)])))
    deframer.feed(frame("S", stream_id, bytes(MAX_BODY_BYTES), end=False))
    with pytest.raises(FramingError, match="body is over"):
        deframer.feed(frame("S", stream_id, b"x"))


def test_an_encoded_body_over_the_limit_is_a_framing_error_on_reading() -> None:
    message = Request(GUID, "POST", "/api/messages", bytes(MAX_BODY_BYTES + 1))
    with pytest.raises(FramingError, match="body is over"):
        Deframer().feed(b"".join(encode(message)))


def test_a_request_json_over_the_limit_in_many_chunks_is_a_framing_error() -> None:
    deframer = Deframer()
    deframer.feed(frame("A", GUID, b"{" * MAX_BODY_BYTES, end=False))
    with pytest.raises(FramingError, match="header payload is over"):
        deframer.feed(frame("A", GUID, b"{", end=False))


@pytest.mark.parametrize("kind", ["A", "B", "S"])
def test_more_than_max_open_unfinished_messages_is_a_framing_error(kind: str) -> None:
    deframer = Deframer()
    for _ in range(MAX_OPEN):
        deframer.feed(frame(kind, new_id(), b"{", end=False))
    assert deframer.open == MAX_OPEN
    with pytest.raises(FramingError, match="open at once"):
        deframer.feed(frame(kind, new_id(), b"{", end=False))


def test_more_of_an_already_open_message_is_not_one_more_open() -> None:
    ids = [new_id() for _ in range(MAX_OPEN)]
    deframer = Deframer()
    for ident in ids:
        deframer.feed(frame("A", ident, b"{", end=False))
    deframer.feed(frame("A", ids[0], b'"verb":"GET"', end=False))
    assert deframer.feed(frame("A", ids[0], b"}")) == [Request(ids[0], "GET", "")]
    assert deframer.open == MAX_OPEN - 1


def test_a_request_naming_more_streams_than_may_be_open_is_a_framing_error() -> None:
    streams = [described(new_id(), 1) for _ in range(MAX_OPEN + 1)]
    with pytest.raises(FramingError, match="open at once"):
        Deframer().feed(frame("A", GUID, head(verb="POST", path="/", streams=streams)))


def test_more_than_max_held_bytes_of_unfinished_messages_is_a_framing_error() -> None:
    deframer = Deframer()
    for _ in range(MAX_HELD_BYTES // MAX_BODY_BYTES - 1):
        deframer.feed(frame("S", new_id(), bytes(MAX_BODY_BYTES), end=False))
    deframer.feed(frame("A", new_id(), b"{" * MAX_BODY_BYTES, end=False))  # headers count too
    assert deframer._held == MAX_HELD_BYTES
    with pytest.raises(FramingError, match="unfinished"):
        deframer.feed(frame("S", new_id(), b"x", end=False))


def test_held_bytes_are_released_when_a_message_completes() -> None:
    deframer = Deframer()
    for _ in range(10):  # 10 x 256 KiB through, never more than 1 MiB at once
        message = Response(new_id(), 200, bytes(MAX_BODY_BYTES), "application/octet-stream")
        assert deframer.feed(b"".join(encode(message))) == [message]
    assert retained(deframer) == NOTHING


# Cancels


def test_cancel_stream_drops_the_stream_and_the_message_waiting_for_it() -> None:
    stream_id = new_id()
    deframer = Deframer()
    deframer.feed(frame("A", GUID, head(verb="POST", path="/", streams=[described(stream_id, 100)])))
    deframer.feed(frame("S", stream_id, bytes(50), end=False))
    assert deframer.feed(frame("C", stream_id)) == []
    assert deframer.cancelled == 1
    assert retained(deframer) == NOTHING
    later = Request(new_id(), "POST", "/", b"{}", CONTENT_TYPE)
    assert deframer.feed(b"".join(encode(later))) == [later]


def test_cancelling_one_of_a_messages_streams_drops_all_of_them() -> None:
    first, second = new_id(), new_id()
    deframer = Deframer()
    deframer.feed(
        frame("A", GUID, head(verb="POST", path="/", streams=[described(first, 2), described(second, 9)]))
    )
    deframer.feed(frame("S", first, b"{}") + frame("S", second, b"abc", end=False))
    assert deframer.feed(frame("C", second)) == []
    assert retained(deframer) == NOTHING


def test_cancel_stream_drops_a_stream_no_message_has_named_yet() -> None:
    stream_id = new_id()
    deframer = Deframer()
    deframer.feed(frame("S", stream_id, b"early", end=False))
    assert deframer.feed(frame("C", stream_id)) == []
    assert retained(deframer) == NOTHING


def test_cancel_stream_for_an_unknown_id_is_counted_and_changes_nothing() -> None:
    deframer = Deframer()
    assert deframer.feed(frame("C", new_id())) == []
    assert deframer.cancelled == 1
    assert retained(deframer) == NOTHING


def test_cancel_all_is_counted_and_ignored() -> None:
    stream_id = new_id()
    deframer = Deframer()
    deframer.feed(frame("A", GUID, head(verb="POST", path="/", streams=[described(stream_id, 2)])))
    assert deframer.feed(frame("X", GUID)) == []
    assert deframer.cancelled == 1
    assert deframer.open == 1
    assert deframer.feed(frame("S", stream_id, b"{}")) == [Request(GUID, "POST", "/", b"{}", CONTENT_TYPE)]
    assert retained(deframer) == NOTHING


# Garbage


@PROPERTY
@given(st.binary(max_size=2000), st.data())
def test_random_bytes_raise_framing_error_or_yield_nothing(garbage: bytes, data: st.DataObject) -> None:
    deframer = Deframer()
    try:
        out = feed_cut(deframer, garbage, draw_cuts(data, [garbage]))
    except FramingError:
        return
    assert out == []


@PROPERTY
@given(st.sampled_from(PayloadType), st.uuids(), st.booleans(), st.binary(max_size=200), st.data())
def test_random_bytes_under_a_valid_header_raise_framing_error_or_read(
    kind: PayloadType, ident: Any, end: bool, payload: bytes, data: st.DataObject
) -> None:
    """Past a valid header the payload is parsed: still only ever a FramingError."""
    wire = frame(kind, str(ident), payload, end=end)
    deframer = Deframer()
    try:
        out = feed_cut(deframer, wire, draw_cuts(data, [wire]))
    except FramingError:
        return
    assert all(isinstance(m, Request | Response) for m in out)
    assert held_matches_contents(deframer)


ODD_TEXT = [None, "", "0", "200", " 7", "OK", "POST", "/api/messages", CONTENT_TYPE, "\u00e9\U0001f600"]


@st.composite
def peer_sessions(draw: st.DrawFn) -> list[bytes]:
    """A misbehaving peer's payloads: valid headers, a few ids reused across payloads, JSON
    and stream bytes that may or may not fit together, cancels anywhere. Stream ids are
    each named by one message at most (two messages naming one stream is a known bug,
    pinned below), and statuses are finite (ditto)."""
    message_ids = [str(u) for u in draw(st.lists(st.uuids(), min_size=1, max_size=3, unique=True))]
    stream_ids = [str(u) for u in draw(st.lists(st.uuids(), min_size=1, max_size=4, unique=True))]
    unnamed = list(stream_ids)
    out = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from("AABBSSSCX"))
        end = draw(st.booleans())
        if kind in "AB":
            ident = draw(st.sampled_from(message_ids))
            if draw(st.booleans()):
                payload = draw(st.binary(max_size=40))
            else:
                named = draw(st.lists(st.sampled_from(unnamed), max_size=2)) if unnamed else []
                unnamed = [s for s in unnamed if s not in named]
                streams = [
                    {
                        "id": s,
                        draw(st.sampled_from(["type", "contentType"])): draw(st.sampled_from(ODD_TEXT)),
                        "length": draw(st.none() | st.integers(-1, 40) | st.booleans()),
                    }
                    for s in named
                ]
                fields = {
                    "verb": draw(st.sampled_from(ODD_TEXT)),
                    "path": draw(st.sampled_from(ODD_TEXT)),
                    "statusCode": draw(st.integers(-5, 999) | st.sampled_from(ODD_TEXT)),
                    "streams": streams or draw(st.sampled_from([None, []])),
                }
                payload = draw(st.sampled_from([b"", BOM])) + json.dumps(fields).encode()
        elif kind == "S":
            ident = draw(st.sampled_from(stream_ids))
            payload = draw(st.binary(max_size=40))
        else:
            ident = draw(st.sampled_from(stream_ids + message_ids))
            payload = b""
        out.append(frame(kind, ident, payload, end=end))
    return out


@PROPERTY
@given(peer_sessions(), st.data())
def test_a_misbehaving_peer_gets_framing_errors_and_the_bounds_stay_true(
    session: list[bytes], data: st.DataObject
) -> None:
    deframer = Deframer()
    wire = b"".join(session)
    bounds = sorted({0, len(wire), *draw_cuts(data, session)})
    try:
        for start, stop in pairwise(bounds):
            for message in deframer.feed(wire[start:stop]):
                assert isinstance(message, Request | Response)
            assert held_matches_contents(deframer)
            assert 0 <= deframer.open <= MAX_OPEN
    except FramingError:
        pass


# Bugs these tests found in framing.py, fixed: each failed before its fix


def empty_body_as_dotnet_sends_it(message_id: str, stream_id: str) -> bytes:
    """.NET, both stacks, for an empty body: the description says length 0, and then one
    S header of length 0 with End set follows (TransportHandler.SendStreamAsync writes a
    header for any stream of 4096 bytes or less; legacy PayloadSender writes the header and
    skips the content)."""
    fields = head(statusCode=200, streams=[described(stream_id, 0)])
    return frame("B", message_id, fields) + frame("S", stream_id, b"")


def test_a_zero_length_stream_payload_after_its_message_leaves_nothing_open() -> None:
    deframer = Deframer()
    assert deframer.feed(empty_body_as_dotnet_sends_it(GUID, new_id())) == [
        Response(GUID, 200, b"", CONTENT_TYPE)
    ]
    assert retained(deframer) == NOTHING


def test_more_than_max_open_empty_bodies_from_dotnet_keep_the_socket_open() -> None:
    deframer = Deframer()
    for _ in range(MAX_OPEN + 1):
        deframer.feed(empty_body_as_dotnet_sends_it(new_id(), new_id()))


@pytest.mark.parametrize("status", [b"1e999", b"Infinity", b"-Infinity"])
def test_an_infinite_status_code_is_a_framing_error(status: bytes) -> None:
    with pytest.raises(FramingError):
        Deframer().feed(frame("B", GUID, b'{"statusCode":' + status + b"}"))


@pytest.mark.parametrize("kind", ["A", "B"])
def test_deeply_nested_json_is_a_framing_error(kind: str) -> None:
    with pytest.raises(FramingError):
        Deframer().feed(frame(kind, GUID, b"[" * 100_000))


def test_two_messages_naming_one_stream_is_a_framing_error_or_harmless() -> None:
    shared, own = new_id(), new_id()
    first = head(verb="POST", path="/", streams=[described(shared, 1), described(own, 1)])
    second = head(verb="POST", path="/", streams=[described(shared, 1)])
    wire = frame("A", new_id(), first) + frame("A", new_id(), second)
    wire += frame("S", shared, b"x") + frame("S", own, b"y")
    deframer = Deframer()
    try:
        deframer.feed(wire)
    except FramingError:
        return


HEX = GUID.replace("-", "")
MISPLACED = {
    "hyphens at the end": spliced(9, f"{HEX}----".encode()),
    "braces around 32 digits": spliced(9, f"{{--{HEX}}}".encode()),
    "hyphens moved": spliced(9, f"{HEX[:4]}-{HEX[4:12]}-{HEX[12:16]}-{HEX[16:20]}-{HEX[20:]}".encode()),
}


@pytest.mark.parametrize("raw", MISPLACED.values(), ids=MISPLACED.keys())
def test_a_guid_with_hyphens_out_of_place_is_a_framing_error(raw: bytes) -> None:
    assert len(raw) == HEADER_BYTES
    with pytest.raises(FramingError):
        Header.parse(raw)
