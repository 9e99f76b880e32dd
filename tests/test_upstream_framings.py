"""Any sequence of legal HTTP/1.1 answers on one kept-alive connection, cut at any points, reads
back as sent: the transport keeps one llhttp parser per connection across responses (and HEADs),
so one answer's framing must never leak into the next one's. A raw socket server writes the
drawn answers, piece by piece, as drawn."""
from __future__ import annotations

import asyncio
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.targets import Target
from router.upstream import Timeouts, UpstreamPool

# The same examples each run (CI must not fail on the draw of the day); CBORG_EXPLORE=N draws N new ones.
EXPLORE = int(os.environ.get("CBORG_EXPLORE") or 0)

bodies = st.binary(max_size=3000) | st.sampled_from([b"", b"0\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n", b"\r\n"])


@st.composite
def answers(draw):
    """(method, wire bytes, the body the caller must read)."""
    kind = draw(st.sampled_from(["length", "chunked", "head", "no-content", "close"]))
    body = draw(bodies)
    extra = draw(st.sampled_from([b"", b"x-a: 1\r\n", b"Content-Type: application/json\r\nX-B:  spaced  \r\n"]))
    status = draw(st.sampled_from([b"200 OK", b"201 Created", b"404 Not Found", b"500 Internal Server Error"]))
    if kind == "length":
        return b"POST", b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\n\r\n%s" % (status, extra, len(body), body), body
    if kind == "head":
        return b"HEAD", b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\n\r\n" % (status, extra, len(body)), b""
    if kind == "no-content":
        return b"POST", b"HTTP/1.1 204 No Content\r\n%s\r\n" % extra, b""
    if kind == "close":          # no length, no chunks: the body ends when the server closes
        return b"POST", b"HTTP/1.0 %s\r\n%s\r\n%s" % (status, extra, body), body
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]) if b > a]
    ext = draw(st.sampled_from([b"", b";name=value"]))
    trailer = draw(st.sampled_from([b"", b"x-trailer: t\r\n"]))
    wire = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in pieces) + b"0\r\n" + trailer + b"\r\n"
    return b"POST", b"HTTP/1.1 %s\r\n%sTransfer-Encoding: chunked\r\n\r\n%s" % (status, extra, wire), body


@st.composite
def exchanges(draw):
    """A few answers for one connection (a close-delimited one only last) and where to cut each."""
    seq = draw(st.lists(answers(), min_size=1, max_size=5))
    seq = [a for a in seq[:-1] if b"HTTP/1.0" not in a[1]] + seq[-1:]
    return [(m, wire, body, sorted(draw(st.lists(st.integers(0, len(wire)), max_size=3)))) for m, wire, body in seq]


async def _run(seq) -> tuple[list[tuple[bytes, int]], int]:
    conns, todo = 0, list(seq)

    async def handler(reader, writer):
        nonlocal conns
        conns += 1
        while todo:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            n = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(n)
            _, wire, _, cuts = todo.pop(0)
            for a, b in zip([0, *cuts], [*cuts, len(wire)]):
                writer.write(wire[a:b])
                await writer.drain()
                await asyncio.sleep(0)
            if b"HTTP/1.0" in wire[:9]:
                break
        writer.close()

    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    pool = UpstreamPool()
    t = Target.parse(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}")
    got = []
    try:
        for method, _, _, _ in seq:
            r = await pool.request(t, method, "/", [(b"content-type", b"application/json")],
                                   b"" if method == b"HEAD" else b"{}", Timeouts(first_byte=3, read=3, total=5))
            got.append((await r.read(), r.status))
    finally:
        await pool.close()
        srv.close()
    return got, conns


@given(seq=exchanges())
@settings(max_examples=EXPLORE or 150, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          derandomize=not EXPLORE)
def test_answers_in_any_framing_and_any_pieces_read_back_as_sent(seq):
    got, conns = asyncio.run(_run(seq))
    assert [b for b, _ in got] == [body for _, _, body, _ in seq]
    assert [s for _, s in got] == [int(wire[9:12]) for _, wire, _, _ in seq]
    assert conns == 1                     # every answer was read to its end, so the connection was kept
