"""The pooled upstream client and the SSE framing, against real sockets."""
from __future__ import annotations

import asyncio

import pytest

from router.sse import SSESplitter, parse_event
from router.targets import Target
from router.upstream import ConnectError, Timeouts, UpstreamError, UpstreamPool, UpstreamTimeout


def test_sse_framing_any_line_ending_and_split_points():
    stream = b"data: a\r\n\r\nevent: x\ndata: b1\ndata: b2\n\n: comment\n\ndata: c\r\rdata: d\n\n"
    for cut in range(1, len(stream)):
        sp = SSESplitter()
        events = sp.feed(stream[:cut]) + sp.feed(stream[cut:]) + sp.flush()
        parsed = [parse_event(e) for e in events]
        assert [p for p in parsed if p[1]] == [("message", b"a"), ("x", b"b1\nb2"), ("message", b"c"),
                                               ("message", b"d")], cut


def test_target_parse():
    t = Target.parse("https://api.openai.com/v1/")
    assert (t.host, t.port, t.path, t.host_header) == ("api.openai.com", 443, "/v1", b"api.openai.com")
    t = Target.parse("http://127.0.0.1:8080")
    assert (t.port, t.path, t.host_header) == (8080, "", b"127.0.0.1:8080")
    with pytest.raises(ValueError):
        Target.parse("ftp://x")


async def _server(handler):
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def _read_request(reader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
    return head + (await reader.readexactly(n) if n else b"")


def _keep_alive(answer):
    """A server answering every request on a connection with `await answer(request, writer)`;
    `handler.conns` counts the connections it was given."""
    async def handler(reader, writer):
        handler.conns += 1
        try:
            while True:
                await answer(await _read_request(reader), writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
    handler.conns = 0
    return handler


async def test_keep_alive_reuse_and_chunked_stream():
    async def answer(req, writer):
        if b"/stream" in req:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for part in (b"data: 1\n\n", b"data: 2\n\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.write(b"0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: b\r\n\r\nok")

    handler = _keep_alive(answer)
    srv, port = await _server(handler)
    pool = UpstreamPool()
    t = Target.parse(f"http://127.0.0.1:{port}")
    for _ in range(5):
        r = await pool.request(t, b"POST", "/x", [(b"content-type", b"application/json")], b"{}")
        assert r.status == 200 and r.header("X-A") == "b"
        assert await r.read() == b"ok"
    r = await pool.request(t, b"POST", "/stream", [], b"")
    got = [c async for c in r.chunks()]
    assert b"".join(got) == b"data: 1\n\ndata: 2\n\n" and len(got) == 2
    assert handler.conns == 1             # one connection served all six exchanges
    await pool.close()
    srv.close()


async def test_stale_pooled_connection_is_retried_once():
    seen = 0

    async def handler(reader, writer):
        nonlocal seen
        await _read_request(reader)
        seen += 1
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()              # server closes the kept-alive connection afterwards

    srv, port = await _server(handler)
    pool = UpstreamPool()
    t = Target.parse(f"http://127.0.0.1:{port}")
    for _ in range(3):
        r = await pool.request(t, b"POST", "/", [], b"")
        assert await r.read() == b"ok"
    assert seen == 3
    await pool.close()
    srv.close()


async def test_timeouts_and_connect_errors():
    async def silent(reader, writer):
        await asyncio.sleep(5)

    srv, port = await _server(silent)
    pool = UpstreamPool()
    t = Target.parse(f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamError) as e:
        await pool.request(t, b"POST", "/", [], b"", Timeouts(first_byte=0.2))
    assert isinstance(e.value, UpstreamTimeout) and "first byte" in str(e.value)
    srv.close()
    with pytest.raises(UpstreamError) as e:
        await pool.request(Target.parse("http://127.0.0.1:1"), b"POST", "/", [], b"")
    assert isinstance(e.value, ConnectError)
    await pool.close()


async def test_body_read_timeout_between_chunks():
    async def slow(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(3)

    srv, port = await _server(slow)
    pool = UpstreamPool()
    r = await pool.request(Target.parse(f"http://127.0.0.1:{port}"), b"POST", "/", [], b"", Timeouts(read=0.2))
    it = r.chunks()
    assert await it.__anext__() == b"abc"
    with pytest.raises(UpstreamError) as e:
        await it.__anext__()
    assert isinstance(e.value, UpstreamTimeout)
    await pool.close()
    srv.close()


async def test_header_injection_refused():
    pool = UpstreamPool()
    with pytest.raises(ValueError):
        await pool.request(Target.parse("http://127.0.0.1:1"), b"POST", "/", [(b"x", b"a\r\nevil: 1")], b"")


async def test_coarse_timers_fire_once_and_cancel():
    from common import timers
    fired = []
    t0 = asyncio.get_running_loop().time()
    timers.call_later(0.05, lambda: fired.append(asyncio.get_running_loop().time() - t0))
    gone = timers.call_later(0.05, fired.append, "cancelled")
    gone.cancel()
    await asyncio.sleep(0.2)
    assert len(fired) == 1 and 0.05 <= fired[0] < 0.05 + 3 * timers.TICK
    wheel = timers._wheels[asyncio.get_running_loop()]
    assert wheel.handle is None and not wheel.slots      # nothing pending: no ticking


# -- every legal framing and size (aiohttp does the framing; these pin what the gateway relies on) ----
async def _one_shot(response: bytes, close: bool = True):
    """A server that answers each request with `response` and closes (HTTP/1.0 style) if asked."""
    async def handler(reader, writer):
        try:
            await _read_request(reader)
            writer.write(response)
            await writer.drain()
        finally:
            if close:
                writer.close()
    return await _server(handler)


async def test_close_delimited_sse_stream_ends_cleanly():
    """HTTP/1.0, no Content-Length, no chunking: the body ends when the server closes."""
    events = b"".join(b"data: {\"n\": %d}\n\n" % i for i in range(50)) + b"data: [DONE]\n\n"
    srv, port = await _one_shot(b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + events)
    pool = UpstreamPool()
    r = await pool.request(Target.parse(f"http://127.0.0.1:{port}"), b"POST", "/", [], b"{}")
    assert b"".join([c async for c in r.chunks()]) == events
    r = await pool.request(Target.parse(f"http://127.0.0.1:{port}"), b"POST", "/", [], b"{}")
    assert await r.read() == events                  # and non-streamed: the close ends the body, no error
    await pool.close()
    srv.close()


async def test_gzip_and_deflate_bodies_are_decompressed():
    import gzip
    import zlib
    raw = b'{"ok": true, "pad": "' + b"x" * 10000 + b'"}'
    for enc, data in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw))):
        head = b"HTTP/1.1 200 OK\r\ncontent-encoding: %s\r\ncontent-length: %d\r\n\r\n" % (enc.encode(), len(data))
        srv, port = await _one_shot(head + data)
        pool = UpstreamPool()
        r = await pool.request(Target.parse(f"http://127.0.0.1:{port}"), b"POST", "/", [], b"")
        assert await r.read() == raw, enc
        await pool.close()
        srv.close()


@pytest.fixture(scope="module")
def big_server():
    """aiohttp.web answering /cl/<MiB> with Content-Length and /chunked/<MiB> chunk by chunk."""
    from aiohttp import web

    from tests.helpers.servers import AiohttpServer
    block = bytes(range(256)) * 4096                     # 1 MiB

    async def cl(req):
        return web.Response(body=block * int(req.match_info["n"]))

    async def chunked(req):
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(req)
        for _ in range(int(req.match_info["n"])):
            await resp.write(block)
        await resp.write_eof()
        return resp
    app = web.Application()
    app.router.add_post("/cl/{n}", cl)
    app.router.add_post("/chunked/{n}", chunked)
    with AiohttpServer(app) as srv:
        yield srv, block


@pytest.mark.parametrize("mib", [1, 4, 50])
async def test_large_bodies_arrive_whole(big_server, mib):
    srv, block = big_server
    pool = UpstreamPool()
    t = Target.parse(srv.url)
    for kind in ("cl", "chunked"):
        r = await pool.request(t, b"POST", f"/{kind}/{mib}", [], b"")
        data = await r.read()
        assert len(data) == mib << 20 and data[:1 << 20] == block and data[-(1 << 20):] == block, kind
    await pool.close()


async def test_body_cap_is_a_protocol_error_not_a_hang(big_server):
    from router.upstream import BodyTooLarge, ProtocolError
    srv, _ = big_server
    pool = UpstreamPool(max_body=2 << 20)
    t = Target.parse(srv.url)
    for kind in ("cl", "chunked"):
        r = await pool.request(t, b"POST", f"/{kind}/4", [], b"")
        with pytest.raises(BodyTooLarge) as e:
            await r.read()
        assert isinstance(e.value, ProtocolError) and "too large" in str(e.value)
    r = await pool.request(t, b"POST", "/cl/1", [], b"")     # the pool still works after a refused body
    assert len(await r.read()) == 1 << 20
    await pool.close()


async def test_stream_back_pressure_pauses_the_socket(big_server):
    """A consumer that stops reading holds the upstream back instead of buffering 50 MiB."""
    srv, _ = big_server
    pool = UpstreamPool()
    r = await pool.request(Target.parse(srv.url), b"POST", "/chunked/50", [], b"")
    it = r.chunks()
    await it.__anext__()
    await asyncio.sleep(0.5)                                   # the server would send it all in this time
    assert r._payload.total_bytes < 8 << 20                  # read from the socket so far: a few buffers
    await it.aclose()                                          # closes the connection mid-body
    await pool.close()


async def test_refused_and_unknown_hosts_are_connect_errors():
    pool = UpstreamPool()
    for url in ("http://127.0.0.1:1", "http://no-such-host.invalid"):
        with pytest.raises(ConnectError) as e:
            await pool.request(Target.parse(url), b"POST", "/", [], b"")
        assert "cannot connect to upstream" in str(e.value)
    await pool.close()


async def test_reused_connection_closed_before_answering_is_retried_once_on_a_new_one():
    """The race a keep-alive timeout makes: the pooled connection looks alive, the request goes out, the
    server closes it without a byte. Retried on a fresh connection; a fresh connection that does the
    same is not retried (the server may have acted on the request)."""
    conns = 0

    async def answer_once(reader, writer):
        nonlocal conns
        conns += 1
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        try:
            await _read_request(reader)          # the next request on this connection: dropped unanswered
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    srv, port = await _server(answer_once)
    pool = UpstreamPool()
    t = Target.parse(f"http://127.0.0.1:{port}")
    for _ in range(3):
        r = await pool.request(t, b"POST", "/", [], b"{}")
        assert await r.read() == b"ok"
    assert conns == 3
    await pool.close()
    srv.close()

    async def never(reader, writer):
        await _read_request(reader)
        writer.close()
    srv, port = await _server(never)
    pool = UpstreamPool()
    from router.upstream import ClosedError
    with pytest.raises(ClosedError):
        await pool.request(Target.parse(f"http://127.0.0.1:{port}"), b"POST", "/", [], b"{}")
    await pool.close()
    srv.close()


async def test_request_head_is_the_transports_own():
    """The request is written by the transport: one Host (the target's) and one Content-Length (the
    body's), whatever the caller's headers say; a path with spaces or non-ASCII goes out encoded."""
    seen = []

    async def handler(reader, writer):
        while True:
            try:
                seen.append(await _read_request(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    srv, port = await _server(handler)
    pool = UpstreamPool()
    t = Target.parse(f"http://127.0.0.1:{port}/v1")
    r = await pool.request(t, b"POST", "/responses/a b\u00e9?x=1", [
        (b"Host", b"evil.example"), (b"content-length", b"999"), (b"Transfer-Encoding", b"chunked"),
        (b"authorization", b"Bearer k")], b"{}")
    assert await r.read() == b"ok"
    r = await pool.request(t, b"GET", "/models", [], b"")
    assert await r.read() == b"ok"
    first, second = (s.split(b"\r\n") for s in seen)
    assert first[0] == b"POST /v1/responses/a%20b%C3%A9?x=1 HTTP/1.1"
    lower = [h.lower() for h in first[1:]]
    assert [h for h in lower if h.startswith(b"host:")] == [b"host: 127.0.0.1:%d" % port]
    assert [h for h in lower if h.startswith(b"content-length:")] == [b"content-length: 2"]
    assert not any(h.startswith(b"transfer-encoding") for h in lower)
    assert b"authorization: Bearer k" in first and first[-1] == b"{}"
    assert second[0] == b"GET /v1/models HTTP/1.1"
    assert not any(h.lower().startswith(b"content-length") for h in second)
    await pool.close()
    srv.close()


async def test_informational_responses_are_skipped():
    """100 Continue and 103 Early Hints before the answer: the caller sees the final response."""
    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
                     b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\nx-final: 1\r\n\r\ndone")
        await writer.drain()
        writer.close()

    srv, port = await _server(handler)
    pool = UpstreamPool()
    r = await pool.request(Target.parse(f"http://127.0.0.1:{port}"), b"POST", "/", [], b"{}")
    assert (r.status, r.header("x-final"), await r.read()) == (201, "1", b"done")
    await pool.close()
    srv.close()


async def test_malformed_response_is_a_protocol_error_and_the_pool_goes_on():
    answers = [b"HTTP/1.1 2x0 Nope\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]

    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()

    srv, port = await _server(handler)
    pool = UpstreamPool()
    t = Target.parse(f"http://127.0.0.1:{port}")
    from router.upstream import ProtocolError
    with pytest.raises(ProtocolError) as e:
        await pool.request(t, b"POST", "/", [], b"{}")
    assert "malformed response" in str(e.value)
    r = await pool.request(t, b"POST", "/", [], b"{}")
    assert await r.read() == b"ok"
    await pool.close()
    srv.close()


async def test_head_then_post_on_one_connection():
    """A HEAD's answer has a Content-Length but no body; the same connection then serves a POST
    whose body is read whole (the response parser is told which is which)."""
    async def answer(req, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n" + (b"" if req.startswith(b"HEAD") else b"hello"))

    handler = _keep_alive(answer)
    srv, port = await _server(handler)
    pool = UpstreamPool()
    t = Target.parse(f"http://127.0.0.1:{port}")
    for method in (b"HEAD", b"POST", b"HEAD", b"POST"):
        r = await pool.request(t, method, "/", [], b"")
        assert await r.read() == (b"" if method == b"HEAD" else b"hello"), method
    assert handler.conns == 1
    await pool.close()
    srv.close()


async def test_total_timeout_ends_a_trickling_body_and_a_late_answer():
    """The total bounds the whole exchange: a body whose chunks each come within the read gap, and
    an answer whose headers are later than the total though sooner than the first-byte timeout."""
    async def trickle(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            for _ in range(40):
                writer.write(b"1\r\nx\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
        except ConnectionError:
            pass

    async def late(reader, writer):
        await _read_request(reader)
        await asyncio.sleep(1)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    srv, port = await _server(trickle)
    pool = UpstreamPool()
    t0 = asyncio.get_running_loop().time()
    r = await pool.request(Target.parse(f"http://127.0.0.1:{port}"), b"POST", "/", [], b"",
                           Timeouts(read=0.5, total=0.6))
    with pytest.raises(UpstreamTimeout) as e:
        await r.read()
    took = asyncio.get_running_loop().time() - t0
    assert "total" in str(e.value) and 0.5 < took < 1.5, took
    srv.close()
    srv, port = await _server(late)
    with pytest.raises(UpstreamTimeout) as e:
        await pool.request(Target.parse(f"http://127.0.0.1:{port}"), b"POST", "/", [], b"",
                           Timeouts(first_byte=5, total=0.3))
    assert "total" in str(e.value)
    await pool.close()
    srv.close()
