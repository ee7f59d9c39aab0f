"""The HTTP fast paths agree with h11, the reference.

``h11serve.parse_simple`` / ``encode_simple`` and ``metaclient.parse_answer_head``
/ ``_Exchange.request`` skip h11 for plain messages.  Each must read or write
exactly what an ``h11.Connection`` would, and leave anything else to h11 (None):
never accept what h11 rejects.  Messages are built from pieces that are mostly
well formed, with odd variants of each piece mixed in, then cut anywhere.
"""

from __future__ import annotations

import re

import h11
import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from storagenode.h11serve import SimpleRequest, encode_simple, parse_simple
from storagenode.httpserve import Response
from storagenode.metaclient import MetaClient, _Exchange, _request_head, parse_answer_head

FAST = settings(max_examples=300, deadline=None)


def pick(*choices: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from(choices)


ODD_VALUE = st.lists(pick(b"a", b"0", b" ", b"\t", b",", b"\x7f", b"\x80", b"\x00", b"\r", b"\n"),
                     max_size=5).map(b"".join)
VALUES = st.one_of(pick(b"", b"x", b"a b", b"a \t b", b"chunked", b"Chunked", b"close",
                        b"keep-alive", b"100-continue", b"h2c"), ODD_VALUE)
NAMES = pick(b"Host", b"host", b"HOST", b"Transfer-Encoding", b"Connection", b"Expect",
             b"Upgrade", b"Content-Type", b"X-A", b"x-a", b"", b"Bad Name", b"X\xe9")
LENGTHS = pick(b"0", b"3", b"003", b"3, 3", b"3,4", b"-3", b"+3", b"0x3", b"", b"65536",
               b"65537", b"999999999", b"1234567890", b"9" * 25)
EOL = pick(b"\r\n", b"\r\n", b"\r\n", b"\n")
FIELD = st.tuples(
    st.one_of(st.tuples(NAMES, VALUES), st.tuples(pick(b"Content-Length", b"content-length"),
                                                   LENGTHS)),
    pick(b":", b": ", b":\t ", b" :"), pick(b"", b"", b" ", b"\t"), EOL,
).map(lambda f: f[0][0] + f[1] + f[0][1] + f[2] + f[3])


@st.composite
def heads(draw: st.DrawFn, first_line: bytes, body: bytes) -> bytes:
    """``first_line``'s head: mostly plain fields, some odd, maybe a length."""
    fields = draw(st.lists(FIELD, max_size=4))
    if draw(st.booleans()):
        fields.append(b"host: node:1\r\n")
    if draw(st.booleans()):
        fields.append(b"Content-Length: %d\r\n" % len(body))
    return first_line + b"".join(draw(st.permutations(fields))) + draw(EOL)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    body = draw(st.binary(max_size=8))
    line = b"%s%s%s%s%s%s" % (
        draw(pick(b"GET", b"POST", b"HEAD", b"CONNECT", b"get", b"M-1", b"", b"G\x80")),
        draw(pick(b" ", b" ", b"  ", b"\t")),
        draw(pick(b"/", b"/v1/rpc", b"/a?b=c%20d", b"*", b"http://x/y", b"", b"/\x7f", b"/\xe9")),
        draw(pick(b" ", b" ", b"  ")),
        draw(pick(b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1")), draw(EOL))
    return draw(pick(b"", b"", b"", b"\r\n")) + draw(heads(line, body)) + body


@st.composite
def answers(draw: st.DrawFn) -> bytes:
    body = draw(st.binary(max_size=8))
    status = draw(st.one_of(st.integers(100, 599).map(b"%d".__mod__),
                            pick(b"204", b"304", b"0200", b"20", b"2x0", b"999")))
    line = b"%s %s%s%s" % (draw(pick(b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2")), status,
                           draw(pick(b" OK", b" ", b"", b" Not Found", b" a\tb", b" \x80", b" \x7f")),
                           draw(EOL))
    return draw(heads(line, body)) + body


def cut_anywhere(data: bytes, draw: st.DataObject) -> bytes:
    """``data`` whole, or cut at any byte."""
    return data[:draw.draw(st.one_of(st.just(len(data)), st.integers(0, len(data))))]


# ---- requests: parse_simple


def h11_reads_request(data: bytes) -> tuple[h11.Request, bytes, bytes]:
    """h11's request at the start of ``data``: head, body and the bytes after it
    (raises if h11 rejects it, fails if it has not all arrived)."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    head = server.next_event()
    assert isinstance(head, h11.Request), head
    body = b""
    while isinstance(event := server.next_event(), h11.Data):
        body += event.data
    assert isinstance(event, h11.EndOfMessage), event
    return head, body, server.trailing_data[0]


def check_simple(data: bytes, start: int) -> SimpleRequest | None:
    """parse_simple's request at ``start``, checked against h11's reading."""
    simple = parse_simple(data, start)
    if simple is not None:
        head, body, rest = h11_reads_request(data[start:])
        assert (head.method.decode(), head.target.decode()) == (simple.method, simple.target)
        assert [(n.decode(), v.decode()) for n, v in head.headers] == list(simple.headers.items())
        assert (body, rest) == (simple.body, data[simple.end:])
        assert simple.raw == data[start:simple.end]
    return simple


@FAST
@given(first=requests(), second=requests(), draw=st.data())
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
    (PLAIN.replace(b"3\r\n", b"003\r\n"), True),
    (PLAIN + PLAIN, True),
    (PLAIN[:-1], False),                                  # body still arriving
    (PLAIN.replace(b"\r\nX", b"\nX"), False),             # bare LF: h11's
    (PLAIN.replace(b"X-A", b"host"), False),              # repeated field
    (PLAIN.replace(b"X-A", b"Expect"), False),
    (PLAIN.replace(b": 3", b": 3, 3"), False),            # h11 allows; not plain
    (PLAIN.replace(b"Host", b"X-B"), False),              # no host: h11 rejects
    (PLAIN.replace(b"X-A:", b"X-A :"), False),            # h11 rejects
])
def test_parse_simple_cases(data: bytes, simple: bool) -> None:
    assert (check_simple(data, 0) is not None) is simple


# ---- responses: encode_simple

RESPONSE_NAMES = st.sampled_from(["Content-Type", "content-type", "X-A", "x-a", "content-length",
                                  "Content-Length", "Transfer-Encoding", "connection", "Host",
                                  "Bad Name", "", "\xe9"])
RESPONSE_VALUES = st.text(st.sampled_from("a0 \t,\xe9\x7f\x00\r\n"), max_size=5)
RESPONSES = st.builds(Response, st.one_of(st.integers(200, 599), st.sampled_from([101, 204, 304, 999])),
                      st.binary(max_size=16), st.dictionaries(RESPONSE_NAMES, RESPONSE_VALUES, max_size=3))
MANAGED = {"content-length", "transfer-encoding", "connection", "host"}


def h11_connection(role: type[h11.SERVER] | type[h11.CLIENT], method: str) -> h11.Connection:
    """An h11 machine in ``role`` after a ``method`` request with no body."""
    connection, request = h11.Connection(role), h11.Connection(h11.CLIENT)
    data = b"".join(request.send(event) or b"" for event in (
        h11.Request(method=method, target="/", headers=[("host", "x")]), h11.EndOfMessage()))
    if role is h11.SERVER:
        connection.receive_data(data)
        assert isinstance(connection.next_event(), h11.Request)
        assert isinstance(connection.next_event(), h11.EndOfMessage)
        return connection
    return request


def h11_writes(method: str, response: Response) -> bytes | None:
    """What h11serve's general path has h11 send; None if h11 refuses."""
    server = h11_connection(h11.SERVER, method)
    headers = [*response.headers.items(), ("content-length", str(len(response.body)))]
    try:
        return b"".join(server.send(event) or b"" for event in (
            h11.Response(status_code=response.status, headers=headers),
            h11.Data(data=b"" if method == "HEAD" else response.body), h11.EndOfMessage()))
    except (h11.LocalProtocolError, UnicodeEncodeError):
        return None


def plain_field(name: str, value: str) -> bool:
    visible = re.fullmatch(r"[!-~]+([ \t]+[!-~]+)*", value) is not None or value == ""
    return name.lower() not in MANAGED and re.fullmatch(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+", name) is not None and visible


@FAST
@given(method=st.sampled_from(["GET", "HEAD", "POST", "DELETE"]), response=RESPONSES)
def test_encode_simple_writes_what_h11_writes(method: str, response: Response) -> None:
    data = encode_simple(method, response)
    if data is None:
        assert (response.status in (204, 304) or not 200 <= response.status <= 599
                or not all(plain_field(*field) for field in response.headers.items()))
        return
    assert data == h11_writes(method, response)
    client = h11_connection(h11.CLIENT, method)
    client.receive_data(data)
    answer = client.next_event()
    assert isinstance(answer, h11.Response) and answer.status_code == response.status
    assert list(answer.headers) == [(n.lower().encode(), v.encode()) for n, v in response.headers.items()] + [
        (b"content-length", b"%d" % len(response.body))]
    body = b""
    while isinstance(event := client.next_event(), h11.Data):
        body += event.data
    assert isinstance(event, h11.EndOfMessage) and not client.trailing_data[0]
    assert body == (b"" if method == "HEAD" else response.body)


# ---- answers: parse_answer_head

EXCHANGE = _Exchange(b"", [(b"host", b"node:1")], b"x")


@FAST
@given(answer=answers(), draw=st.data())
def test_parse_answer_head_reads_what_h11_reads(answer: bytes, draw: st.DataObject) -> None:
    data = cut_anywhere(answer, draw)
    head = parse_answer_head(data)
    if head is None:
        return
    status, length, start = head
    client = h11.Connection(h11.CLIENT)
    for event in EXCHANGE.events():
        client.send(event)
    body = b"z" * min(length, 64)       # h11 reads it all as body iff the head ends at start
    client.receive_data(data[:start] + body)
    response = client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == status
    assert [int(v) for n, v in response.headers if n == b"content-length"] == [length]
    read = b""
    while isinstance(event := client.next_event(), h11.Data):
        read += event.data
    assert read == body
    assert event is (h11.NEED_DATA if length > len(body) else event)
    assert isinstance(event, h11.EndOfMessage) or length > len(body)


# ---- requests the client sends: _Exchange.request


def h11_sends(exchange: _Exchange) -> bytes:
    client = h11.Connection(h11.CLIENT)
    return b"".join(client.send(event) or b"" for event in exchange.events())


@FAST
@given(fields=st.lists(st.tuples(pick(b"content-type", b"Authorization", b"X-A", b"x-a", b"host",
                                      b"Bad Name", b""), VALUES), max_size=3),
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
