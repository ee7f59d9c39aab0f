"""The HTTP fast paths agree with h11, the reference.

``h11serve.parse_simple`` / ``encode_simple`` and ``metaclient.parse_answer_head``
/ ``_Exchange.request`` skip h11 for plain messages.  Each must read or write
exactly what an ``h11.Connection`` would, and leave anything else to h11 (None):
never accept what h11 rejects.  Messages are built from pieces, each plain but
for at most two odd ones, then cut anywhere.
"""

from __future__ import annotations

import re
from typing import Any

import h11
import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from storagenode.h11serve import SimpleRequest, encode_simple, parse_simple
from storagenode.httpserve import Response
from storagenode.metaclient import MetaClient, _Exchange, _request_head, parse_answer_head

FAST = settings(max_examples=150, deadline=None)


def pick(*choices: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from(choices)


Piece = tuple[str, st.SearchStrategy[bytes], st.SearchStrategy[bytes]]   # name, plain, odd

OWS = pick(b"", b" ", b"\t", b" \t ")
PLAIN_FIELDS = st.lists(st.tuples(
    pick(b"Content-Type", b"content-type", b"X-A", b"x-a", b"Authorization", b"ETag"), OWS,
    st.text(st.sampled_from("a0 \t,;=/%"), max_size=6).map(lambda v: v.strip(" \t").encode()),
    OWS), max_size=3, unique_by=lambda f: f[0].lower()).map(
    lambda fields: [b"%s:%s%s%s\r\n" % f for f in fields])
ODD_VALUES = st.lists(pick(b"a", b" ", b"\t", b",", b"\x7f", b"\x80", b"\x00", b"\r", b"\n"),
                      max_size=4).map(b"".join)
LENGTHS = pick(b"3", b"3, 3", b"3,4", b"-3", b"+3", b"0x3", b"", b"65536", b"65537",
               b"999999999", b"1234567890", b"9" * 25)
ODD_FIELDS = st.tuples(pick(b"X-A", b"", b"Bad Name", b"X\xe9"), pick(b":", b" :"), OWS,
                       ODD_VALUES, pick(b"\r\n", b"\n")).map(b"".join)
FRAMING = pick(b"Transfer-Encoding: chunked\r\n", b"transfer-encoding:Chunked\r\n",
               b"Transfer-Encoding: gzip\r\n", b"Connection: close\r\n",
               b"Connection: keep-alive\r\n", b"Expect: 100-continue\r\n", b"Upgrade: h2c\r\n",
               b"Content-Length: {n}\r\n", b"X-A: 1\r\nx-a: 2\r\n")
EOL: Piece = ("eol", pick(b"\r\n"), pick(b"\n", b" \r\n"))
END: Piece = ("end", pick(b"\r\n"), pick(b"\n", b" \r\n"))
SOME_FIELDS: Piece = ("fields", st.just(b""), ODD_FIELDS)
SOME_FRAMING: Piece = ("framing", st.just(b""), FRAMING)
# {n}: the body's length; no length at all is odd
LENGTH: Piece = ("length", pick(b"Content-Length: {n}\r\n", b"content-length: 00{n}\r\n"),
                 st.one_of(st.just(b""), LENGTHS.map(b"Content-Length: %s\r\n".__mod__)))
REQUEST_LINE: list[Piece] = [
    ("start", st.just(b""), pick(b"\r\n", b"\n")),
    ("method", pick(b"GET", b"POST", b"HEAD", b"get", b"M-1"), pick(b"CONNECT", b"", b"G\x80")),
    ("sp", pick(b" "), pick(b"  ", b"\t")),
    ("target", pick(b"/", b"/v1/rpc", b"/a?b=c%20d", b"*", b"http://x/y"),
     pick(b"", b"/\x7f", b"/\xe9", b"/ x")),
    ("version", pick(b" HTTP/1.1"), pick(b" HTTP/1.0", b" HTTP/2.0", b" http/1.1")), EOL]
REQUEST_FIELDS: list[Piece] = [
    ("host", pick(b"Host: node:1\r\n", b"host:x\r\n"), pick(b"", b"Host: a\r\nhost: b\r\n")),
    SOME_FIELDS, SOME_FRAMING, LENGTH]
ANSWER_LINE: list[Piece] = [
    ("version", pick(b"HTTP/1.1 "), pick(b"HTTP/1.0 ", b"HTTP/2 ", b"http/1.1 ")),
    ("status", st.integers(200, 599).map(b"%d".__mod__),
     pick(b"100", b"101", b"204", b"304", b"0200", b"20", b"2x0", b"999")),
    ("reason", pick(b" OK", b" ", b" Not Found", b" a\tb"), pick(b"", b" \x80", b" \x7f")), EOL]


@st.composite
def messages(draw: st.DrawFn, line: list[Piece], fields: list[Piece]) -> bytes:
    """A message of these pieces and a few plain fields, the fields in any order."""
    spoilt = draw(st.sets(st.sampled_from([p[0] for p in line + fields + [END]]), max_size=2))

    def part(piece: Piece) -> bytes:
        return draw(piece[2] if piece[0] in spoilt else piece[1])

    body = draw(st.binary(max_size=8))
    head = [*(part(p) for p in line), *draw(st.permutations(
        [*draw(PLAIN_FIELDS), *(part(p) for p in fields)])), part(END)]
    return b"".join(head).replace(b"{n}", b"%d" % len(body)) + body


def cut_anywhere(data: bytes, draw: st.DataObject) -> bytes:
    """``data`` whole, or cut at any byte."""
    return data[:draw.draw(st.one_of(st.just(len(data)), st.integers(0, len(data))))]


def h11_reads(machine: h11.Connection, head_type: type[Any]) -> tuple[Any, bytes, Any]:
    """The message ``machine`` received: its head, its body, and the event after
    the body (raises if h11 rejects it)."""
    head = machine.next_event()
    assert isinstance(head, head_type), head
    body = b""
    while isinstance(event := machine.next_event(), h11.Data):
        body += event.data
    return head, body, event


# ---- requests: parse_simple


def check_simple(data: bytes, start: int) -> SimpleRequest | None:
    """parse_simple's request at ``start``, checked against h11's reading."""
    simple = parse_simple(data, start)
    if simple is not None:
        server = h11.Connection(h11.SERVER)
        server.receive_data(data[start:])
        head, body, end = h11_reads(server, h11.Request)
        assert isinstance(end, h11.EndOfMessage), end
        assert (head.method.decode(), head.target.decode()) == (simple.method, simple.target)
        assert [(n.decode(), v.decode()) for n, v in head.headers] == list(simple.headers.items())
        assert (body, server.trailing_data[0]) == (simple.body, data[simple.end:])
        assert simple.raw == data[start:simple.end]
    return simple


@FAST
@given(first=messages(REQUEST_LINE, REQUEST_FIELDS),
       second=messages(REQUEST_LINE, REQUEST_FIELDS), draw=st.data())
def test_parse_simple_reads_what_h11_reads(first: bytes, second: bytes,
                                           draw: st.DataObject) -> None:
    data = cut_anywhere(first + second, draw)
    simple = check_simple(data, 0)
    if simple is not None:
        check_simple(data, simple.end)        # the pipelined request after it
    check_simple(data, min(len(first), len(data)))


PLAIN = b"POST /v1/rpc HTTP/1.1\r\nHost: node:1\r\ncontent-length: 3\r\nX-A:\t a  b \r\n\r\nabc"


@pytest.mark.parametrize("data, simple", [
    (PLAIN, True),
    (PLAIN.replace(b": 3", b": 003"), True),
    (PLAIN + PLAIN[:-1], True),
    (PLAIN[:-1], False),                                  # body still arriving
    (PLAIN.replace(b"\r\nX", b"\nX"), False),             # bare LF: h11's
    (PLAIN.replace(b"X-A", b"host"), False),              # repeated field
    (PLAIN.replace(b"X-A:", b"Transfer-Encoding: chunked\r\nX-A:"), False),
    (PLAIN.replace(b"X-A:", b"Connection: close\r\nX-A:"), False),
    (PLAIN.replace(b": 3", b": 3, 3"), False),            # h11 allows it; not plain
    (PLAIN.replace(b"Host", b"X-B"), False),              # no host: h11 rejects
    (PLAIN.replace(b"X-A:", b"X-A :"), False),            # h11 rejects
])
def test_parse_simple_cases(data: bytes, simple: bool) -> None:
    assert (check_simple(data, 0) is not None) is simple


# ---- responses: encode_simple

PLAIN_RESPONSE_FIELDS = st.dictionaries(
    st.sampled_from(["Content-Type", "content-type", "X-A", "x-a", "ETag"]),
    st.text(st.sampled_from("a0 \t,;=/"), max_size=5).map(lambda v: v.strip(" \t")), max_size=3)
ODD_RESPONSE_FIELDS = st.dictionaries(
    st.sampled_from(["content-length", "Content-Length", "Transfer-Encoding", "connection",
                     "Host", "host", "Bad Name", "", "\xe9"]),
    st.one_of(st.just("x"), st.text(st.sampled_from("a0 \t,\xe9\x7f\x00\r\n"), max_size=4)),
    min_size=1, max_size=2)
RESPONSES = st.builds(
    Response, st.one_of(*[st.integers(200, 599)] * 3, st.sampled_from([101, 204, 304, 999])),
    st.binary(max_size=16), st.builds(lambda plain, odd: {**plain, **odd}, PLAIN_RESPONSE_FIELDS,
                                      st.one_of(st.just({}), ODD_RESPONSE_FIELDS)))


def h11_answers(method: str, response: Response) -> tuple[bytes, h11.Connection]:
    """What h11serve's general path has h11 send for ``response`` to a ``method``
    request, and an h11 client that sent that request."""
    client, server = h11.Connection(h11.CLIENT), h11.Connection(h11.SERVER)
    server.receive_data(b"".join(client.send(event) or b"" for event in (
        h11.Request(method=method, target="/", headers=[("host", "x")]), h11.EndOfMessage())))
    h11_reads(server, h11.Request)
    headers = [*response.headers.items(), ("content-length", str(len(response.body)))]
    return b"".join(server.send(event) or b"" for event in (
        h11.Response(status_code=response.status, headers=headers),
        h11.Data(data=b"" if method == "HEAD" else response.body), h11.EndOfMessage())), client


def plain_field(name: str, value: str) -> bool:
    """Neither managed by h11 nor outside the narrowed grammar (visible ASCII)."""
    return (name.lower() not in {"content-length", "transfer-encoding", "connection", "host"}
            and re.fullmatch(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+", name) is not None
            and re.fullmatch(r"([!-~]+([ \t]+[!-~]+)*)?", value) is not None)


def check_encode(method: str, response: Response) -> bytes | None:
    """encode_simple's bytes, checked against h11's writing and reading."""
    data = encode_simple(method, response)
    if data is None:
        assert (response.status in (204, 304) or not 200 <= response.status <= 599
                or not all(plain_field(*field) for field in response.headers.items()))
        return None
    expected, client = h11_answers(method, response)
    assert data == expected
    client.receive_data(data)
    answer, body, end = h11_reads(client, h11.Response)
    assert answer.status_code == response.status
    assert list(answer.headers) == [(n.lower().encode(), v.encode())
                                    for n, v in response.headers.items()] + [
        (b"content-length", b"%d" % len(response.body))]
    assert body == (b"" if method == "HEAD" else response.body)
    assert isinstance(end, h11.EndOfMessage) and not client.trailing_data[0]
    return data


@FAST
@given(method=st.sampled_from(["GET", "HEAD", "POST", "head", "M-1"]), response=RESPONSES)
def test_encode_simple_writes_what_h11_writes(method: str, response: Response) -> None:
    check_encode(method, response)


@pytest.mark.parametrize("method, response, encoded", [
    ("GET", Response(200, b"x", {"Content-Type": "a  b"}), True),
    ("HEAD", Response(404, b"xy", {}), True),
    ("GET", Response(200, b"x", {"x-a": "1", "Host": "h"}), False),      # h11 puts host first
    ("GET", Response(200, b"x", {"Content-Length": "1"}), False),
    ("GET", Response(200, b"", {"connection": "close"}), False),
    ("GET", Response(204, b"", {}), False),
    ("GET", Response(200, b"", {"x-a": "\xe9"}), False),
])
def test_encode_simple_cases(method: str, response: Response, encoded: bool) -> None:
    assert (check_encode(method, response) is not None) is encoded


# ---- answers: parse_answer_head


@FAST
@given(answer=messages(ANSWER_LINE, [SOME_FIELDS, SOME_FRAMING, LENGTH]), draw=st.data())
def test_parse_answer_head_reads_what_h11_reads(answer: bytes, draw: st.DataObject) -> None:
    data = cut_anywhere(answer, draw)
    head = parse_answer_head(data)
    if head is None:
        return
    status, length, start = head
    client = h11.Connection(h11.CLIENT)
    for event in _Exchange(b"", [(b"host", b"node:1")], b"x").events():
        client.send(event)
    pad = b"z" * min(length, 64)        # all of it is body iff h11's head ends at start
    client.receive_data(data[:start] + pad)
    response, body, end = h11_reads(client, h11.Response)
    assert response.status_code == status and body == pad
    assert [int(v) for n, v in response.headers if n == b"content-length"] == [length]
    assert end is h11.NEED_DATA if length > len(pad) else isinstance(end, h11.EndOfMessage)


ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 003\r\nX:  a \r\n\r\nabc"


@pytest.mark.parametrize("data, head", [
    (ANSWER, (200, 3, len(ANSWER) - 3)),
    (ANSWER[:30], None),                                              # head still arriving
    (b"HTTP/1.1 100 Continue\r\n\r\n" + ANSWER, None),
    (ANSWER.replace(b"X:", b"Transfer-Encoding:"), None),
    (ANSWER.replace(b"X:", b"Connection:"), None),
    (ANSWER.replace(b"X:  a", b"content-length: 3"), None),           # duplicate length
    (ANSWER.replace(b"200", b"204"), None),
])
def test_parse_answer_head_cases(data: bytes, head: tuple[int, int, int] | None) -> None:
    assert parse_answer_head(data) == head


# ---- requests the client sends: _Exchange.request, given fields as MetaClient
# gives them (host first, no content-length or transfer-encoding: see below)


def h11_sends(exchange: _Exchange) -> bytes:
    client = h11.Connection(h11.CLIENT)
    return b"".join(client.send(event) or b"" for event in exchange.events())


@FAST
@given(fields=st.lists(st.tuples(pick(b"content-type", b"X-A", b"host", b"Bad Name", b""),
                                 st.one_of(pick(b"", b"a b", b"Bearer x"), ODD_VALUES)), max_size=3),
       host=pick(b"host", b"Host"), body=st.binary(max_size=64))
def test_exchange_request_is_what_h11_sends(fields: list[tuple[bytes, bytes]], host: bytes,
                                            body: bytes) -> None:
    headers = [(host, b"node:1"), *fields]
    try:
        head = _request_head(headers)
    except ValueError:
        with pytest.raises(h11.LocalProtocolError):
            h11.Request(method="POST", target="/v1/rpc", headers=headers)
        return
    exchange = _Exchange(head, headers, body)
    assert exchange.request() == h11_sends(exchange)


def test_meta_client_request_is_what_h11_sends() -> None:
    client = MetaClient("[::1]:7000", "s" * 32)
    exchange = _Exchange(client._head, client._headers,
                         msgpack.packb({"method": "getattr", "args": {"ino": 1}}))
    assert exchange.request() == h11_sends(exchange)
