"""The HTTP client to providers and engines: aiohttp behind the small interface the pipeline uses.

`UpstreamPool.request(target, method, path, headers, body, timeouts)` returns once the response
headers are in; the body is read with `read()` (capped, default 64 MiB) or `chunks()` (as it
arrives, with back-pressure), and `release()` gives the connection back.

aiohttp does the protocol: its connector finds or opens the connection (pooled keep-alive with
expiry and a cap per upstream, DNS cache, TLS, forward proxies with CONNECT for https) and its
ResponseHandler parses the answer with llhttp into a StreamReader (every legal framing:
Content-Length, chunked, close-delimited; gzip/deflate; flow control). The request itself is one
write of bytes built here (request line, Host, the caller's headers, Content-Length, body):
aiohttp's ClientRequest/ClientResponse pair (a payload object, a writer task, header multidicts
per request) cost the gateway about a quarter of its throughput for nothing a gateway sends
(docs/benchmarks.md, "The request written on aiohttp's connector and parser"). A ClientRequest is
built once per target, never sent, to tell the connector where to connect (the `dialer`).
What stays ours: the four timeouts (connect, first byte, read gap, total) on the coarse timer wheel
(common/timers.py) instead of an event-loop timer per request and per chunk, one retry of a stale
pooled connection, refusing header values with line breaks, typed errors whose messages name the
upstream or proxy but never credentials. The proxy is part of the Target (router/proxies.py).
"""
from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import quote

import aiohttp
from aiohttp.connector import Connection
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from yarl import URL

from common import timers
from common.bounded import BoundedDict

from .targets import Proxy, Target

DEFAULT_MAX_BODY = 64 << 20          # non-streamed bodies past this are refused (a 502)
DEFAULT_CONNS_PER_HOST = 1024        # open connections per upstream (and proxy); more requests wait
KEEPALIVE_S = 30.0                   # an idle pooled connection older than this is closed, not reused
_READ_BUFSIZE = 1 << 19              # a streamed body pauses the socket past 2x this unread


class UpstreamError(Exception):
    """A failure talking to an upstream; the subclasses say what kind."""


class ConnectError(UpstreamError):
    """No connection: refused, unknown host, TLS failure, or a proxy that refused."""


class UpstreamTimeout(UpstreamError):
    """A timeout: first byte, read gap or total (ConnectTimeout for connecting)."""


class ConnectTimeout(UpstreamTimeout):
    """Connecting took too long; nothing was sent."""


class ClosedError(UpstreamError):
    """The upstream closed the connection before the response ended."""


class ProtocolError(UpstreamError):
    """The response could not be read: malformed, or over the body cap."""


class BodyTooLarge(ProtocolError):
    pass


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0
    first_byte: float = 600.0   # until the response headers (for non-streams: the whole generation)
    read: float = 300.0         # longest silence between two chunks of a body
    total: float = 1800.0       # whole exchange


def _where(target: Target) -> str:
    return f"{target.host}:{target.port}" + (f" through the proxy {target.proxy.label}" if target.proxy else "")


def _timed_out(what: str, t: Timeouts) -> UpstreamTimeout:
    if what == "first byte":
        return UpstreamTimeout(f"upstream timed out (waiting for the first byte after {t.first_byte:g} s)")
    if what == "read":
        return UpstreamTimeout(f"upstream timed out (reading the body after {t.read:g} s of silence)")
    return UpstreamTimeout(f"upstream timed out (total after {t.total:g} s)")


def _convert(e: BaseException, target: Target, t: Timeouts, fired: str | None = None) -> UpstreamError:
    """An aiohttp (or OS) exception as one of ours; `fired`: the timeout of ours that closed the connection."""
    if fired is not None:
        return _timed_out(fired, t)
    if isinstance(e, asyncio.TimeoutError):       # connecting (the connector's own timeout)
        return ConnectTimeout(f"upstream timed out (connect after {t.connect:g} s) connecting to {_where(target)}")
    if isinstance(e, aiohttp.ClientProxyConnectionError):
        return ConnectError(f"cannot connect to the proxy {target.proxy.label if target.proxy else '?'} "
                            f"for {target.host}:{target.port}: {_os_reason(e)}")
    if isinstance(e, aiohttp.ClientHttpProxyError):
        return ConnectError(f"the proxy {target.proxy.label if target.proxy else '?'} refused the connection to "
                            f"{target.host}:{target.port} (HTTP {e.status} {e.message})")
    if isinstance(e, aiohttp.ClientConnectorError):
        return ConnectError(f"cannot connect to upstream {_where(target)}: {_os_reason(e)}")
    if isinstance(e, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError,
                      ConnectionError)):
        return ClosedError("upstream closed the connection before the response ended")
    if isinstance(e, (aiohttp.ClientResponseError, HttpProcessingError)):
        return ProtocolError(f"malformed response from upstream: {e.message}")
    return ProtocolError(f"upstream request failed: {type(e).__name__}: {e}")


def _os_reason(e: aiohttp.ClientConnectorError) -> str:
    err = e.os_error
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


class _Watch:
    """The timeouts of one exchange, on coarse timers (common/timers.py: no event-loop timer per
    request). One that fires closes the connection; the read that was waiting then fails, and the
    error names the timeout instead of the close."""

    __slots__ = ("conn", "payload", "fired", "total", "gap", "deadline")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline             # time.monotonic() past which the exchange has taken too long
        self.conn: Connection | None = None
        self.payload: StreamReader | None = None
        self.fired: str | None = None
        self.total: timers.Timeout | None = None
        self.gap: timers.Timeout | None = None

    def fire(self, what: str) -> None:
        if self.fired is None:
            self.fired = what
            if self.payload is not None:
                _fail(self.payload)                   # fails the body's pending read
            if self.conn is not None:
                self.conn.close()                     # fails the wait for the headers

    def arm_total(self) -> None:
        """Start the total timeout for the body, at its first wait: a body that is all there with the
        headers (most non-streamed answers) never needs one."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.fire("total")
        else:
            self.total = timers.call_later(left, self.fire, "total")

    def cancel(self) -> None:
        if self.total is not None:
            self.total.cancel()
            self.total = None
        if self.gap is not None:
            self.gap.cancel()
            self.gap = None


class UpstreamResponse:
    """Status and headers of an upstream response; the body is read with read() or chunks()."""

    __slots__ = ("status", "headers", "_payload", "_conn", "_pool", "_target", "_timeouts", "_watch")

    def __init__(self, status: int, headers, payload: StreamReader, conn: Connection, pool: "UpstreamPool",
                 target: Target, timeouts: Timeouts, watch: _Watch):
        self.status = status
        self.headers = headers        # a case-insensitive multidict
        self._payload = payload
        self._conn: Connection | None = conn
        self._pool = pool
        self._target = target
        self._timeouts = timeouts
        self._watch = watch

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    async def _next(self) -> bytes:
        """The next piece of the body (b"" at its end), within the read gap."""
        w = self._watch
        if w.total is None:
            w.arm_total()
        w.gap = timers.call_later(self._timeouts.read, w.fire, "read")
        try:
            return await self._payload.readany()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise _convert(e, self._target, self._timeouts, w.fired) from None
        finally:
            w.gap.cancel()
            w.gap = None

    async def read(self) -> bytes:
        """The whole body, up to the pool's cap (BodyTooLarge past it)."""
        payload = self._payload
        cap = self._pool.max_body
        try:
            if payload.is_eof():                         # all there already: the common case
                if payload.total_bytes > cap:
                    raise BodyTooLarge(self._too_large(payload.total_bytes))
                return payload.read_nowait(-1)
            cl = self.headers.get("Content-Length")
            if cl is not None and cl.isdigit() and int(cl) > cap and "Content-Encoding" not in self.headers:
                raise BodyTooLarge(self._too_large(int(cl)))
            parts, size = [], 0
            while True:
                data = await self._next()
                if not data:
                    return b"".join(parts)
                size += len(data)
                if size > cap:
                    raise BodyTooLarge(self._too_large(None))
                parts.append(data)
        except UpstreamError:
            raise
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise _convert(e, self._target, self._timeouts, self._watch.fired) from None
        finally:
            self.release()

    def _too_large(self, n: int | None) -> str:
        size = f"{n:,} bytes" if n is not None else "more"
        return (f"the upstream's response is too large ({size}; this gateway reads at most "
                f"{self._pool.max_body:,} bytes of a non-streamed answer: CBORG_UPSTREAM_MAX_BODY_BYTES)")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; reading pauses while the consumer is behind."""
        try:
            while True:
                data = await self._next()
                if not data:
                    return
                yield data
        finally:
            self.release()

    def release(self) -> None:
        """Give the connection back to the pool if the body was read to its end, else close it."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._watch.cancel()
            if self._payload.is_eof() and self._payload.exception() is None:
                conn.release()        # back to the pool unless the upstream asked to close
            else:
                _fail(self._payload)
                conn.close()


class UpstreamPool:
    """One aiohttp connector (pooled keep-alive connections per upstream and proxy) for the gateway."""

    def __init__(self, max_body: int = DEFAULT_MAX_BODY, conns_per_host: int = DEFAULT_CONNS_PER_HOST,
                 keepalive_s: float = KEEPALIVE_S):
        self.max_body = max_body
        self._conns_per_host = conns_per_host
        self._keepalive_s = keepalive_s
        self._connector: aiohttp.TCPConnector | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dialers: dict[Target, aiohttp.ClientRequest] = BoundedDict(4096)
        # (target, method, path) -> the request line and the dialer; paths with ids (stored responses) vary
        self._lines: dict[tuple, tuple[bytes, aiohttp.ClientRequest]] = BoundedDict(4096)
        self._blocks: dict[tuple, bytes] = BoundedDict(1024)       # header lists -> their lines
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.TCPConnector:
        self._loop = asyncio.get_running_loop()
        self._connector = aiohttp.TCPConnector(limit=0, limit_per_host=self._conns_per_host,
                                               keepalive_timeout=self._keepalive_s, ttl_dns_cache=60)
        return self._connector

    def _dialer(self, target: Target) -> aiohttp.ClientRequest:
        """What the connector needs to find or open a connection to `target` (host, port, TLS, proxy):
        a ClientRequest built once per target and never sent (see request())."""
        d = self._dialers.get(target)
        if d is None:
            proxy = proxy_headers = None
            if target.proxy is not None:
                proxy = URL(target.proxy.url)
                if target.scheme == "https" and target.proxy.user:
                    # Host is set here as the connector would set it on first use, so that the
                    # pool key (which hashes these headers) is the same for every request
                    proxy_headers = {"Proxy-Authorization": _basic(target.proxy), "Host": target.host_header.decode()}
            d = self._dialers[target] = aiohttp.ClientRequest(
                "GET", URL(target.url(), encoded=True), loop=self._loop, proxy=proxy, proxy_headers=proxy_headers)
        return d

    def _connect_timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        ct = self._timeouts.get(seconds)
        if ct is None:
            # connect: waiting for a free connection (limit per host) and opening one, proxy and TLS included
            ct = self._timeouts[seconds] = aiohttp.ClientTimeout(connect=seconds, sock_connect=seconds)
        return ct

    async def request(self, target: Target, method: bytes, path: str, headers: list[tuple[bytes, bytes]],
                      body: bytes = b"", timeouts: Timeouts = Timeouts()) -> UpstreamResponse:
        """Send one request; returns once the response headers are in.

        A pooled connection that turns out dead before any response byte is retried once on a
        new one (the server closed an idle keep-alive connection; nothing was processed).
        """
        k = (target, method, path)
        got = self._lines.get(k)
        if got is None:
            got = self._lines[k] = (_request_line(target, method, path), self._dialer(target))
        line, dialer = got
        hk = tuple(headers)             # the same few headers per endpoint: serialized and checked once
        block = self._blocks.get(hk)
        if block is None:
            block = self._blocks[hk] = _header_block(headers)
        if body or method not in (b"GET", b"HEAD"):
            head = line + block + b"Content-Length: %d\r\n\r\n" % len(body)
        else:
            head = line + block + b"\r\n"
        connector = self._connector or self._open()
        ct = self._connect_timeout(timeouts.connect)
        skip_payload = method == b"HEAD"
        w = _Watch(time.monotonic() + timeouts.total)
        try:
            for attempt in (0, 1):
                try:
                    conn = await connector.connect(dialer, [], ct)
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                    raise _convert(e, target, timeouts, w.fired) from None
                proto = conn.protocol
                assert proto is not None
                made_for = getattr(proto, "_cborg_skip", None)   # None: a new connection
                reused = made_for is not None
                w.conn = conn
                # one timer until the headers: the first-byte timeout, or what is left of the total if sooner
                left = w.deadline - time.monotonic()
                w.gap = (timers.call_later(timeouts.first_byte, w.fire, "first byte") if timeouts.first_byte < left
                         else timers.call_later(max(left, 0.0), w.fire, "total"))
                try:
                    # aiohttp's parser (llhttp) reads the response: every framing, decompression,
                    # flow control of the body; the request itself is one write of bytes we built.
                    if made_for is not skip_payload or proto._parser is None:
                        # the parser stays for the connection's next responses, as aiohttp's server keeps
                        # its request parser (a connection that failed or was upgraded is not reused)
                        proto.set_response_params(skip_payload=skip_payload, read_until_eof=True,
                                                  auto_decompress=True, read_bufsize=_READ_BUFSIZE)
                        proto._cborg_skip = skip_payload  # type: ignore[attr-defined]
                    transport = proto.transport
                    if transport is None or transport.is_closing():
                        raise aiohttp.ServerDisconnectedError()
                    if body and len(body) > _COALESCE:
                        transport.writelines((head, body))
                    else:
                        transport.write(head + body if body else head)
                    while True:
                        message, payload = await proto.read()
                        code = message.code
                        if code > 199 or code < 100 or code == 101:
                            break                   # 1xx (100 Continue, 103 Early Hints) are skipped
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError) as e:
                    conn.close()
                    if attempt == 0 and reused and w.fired is None:
                        continue                    # a stale pooled connection: once more on a new one
                    raise _convert(e, target, timeouts, w.fired) from None
                except (aiohttp.ClientError, HttpProcessingError, OSError, asyncio.TimeoutError) as e:
                    conn.close()
                    raise _convert(e, target, timeouts, w.fired) from None
                except BaseException:
                    conn.close()
                    raise
                finally:
                    w.gap.cancel()
                    w.gap = None
                if code == 407 and target.proxy is not None:     # a plain-http request the proxy refused
                    conn.close()
                    raise ConnectError(f"the proxy {target.proxy.label} refused the request to {target.host}:"
                                       f"{target.port} (HTTP 407: its credentials are missing or wrong)")
                w.payload = payload
                return UpstreamResponse(code, message.headers, payload, conn, self, target, timeouts, w)
            raise AssertionError("unreachable")
        except BaseException:
            w.cancel()
            raise

    async def close(self) -> None:
        if self._connector is not None:
            await self._connector.close()
            self._connector = None


_COALESCE = 1 << 14        # a body up to this is sent in the same write (one copy) as the head
_PATH_SAFE = "/?&=%:@!$'()*+,;~-._"
_DROP = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection"))


def _request_line(target: Target, method: bytes, path: str) -> bytes:
    """The request line and Host: a plain-http request through a proxy names the whole URL
    (absolute form) and carries the proxy's credentials."""
    if not path.isprintable() or " " in path or not path.isascii():
        path = quote(path, safe=_PATH_SAFE)          # an id or query from a client, made a legal target
    if target.proxy is not None and target.scheme == "http":
        line = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target.url(path).encode(), target.host_header)
        if target.proxy.user:
            line += b"Proxy-Authorization: %s\r\n" % _basic(target.proxy).encode()
        return line
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, (target.path + path).encode(), target.host_header)


def _header_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The caller's headers, one per line; Host, Content-Length and framing headers are the
    transport's own and are left out. A line break in a name or value is refused (no header can
    smuggle another). Made once per distinct header list (UpstreamPool._blocks)."""
    lines = []
    for k, v in headers:
        if b"\r" in v or b"\n" in v or b"\r" in k or b"\n" in k:
            raise ValueError(f"header {k!r} has a line break")
        if k.lower() not in _DROP:
            lines.append(k + b": " + v + b"\r\n")
    return b"".join(lines)


def _basic(p: Proxy) -> str:
    return "Basic " + base64.b64encode(f"{p.user}:{p.password or ''}".encode()).decode()


_CLOSED = aiohttp.ClientConnectionError("Connection closed")


def _fail(payload: StreamReader) -> None:
    """End a body's reads with "connection closed" (unless they already failed otherwise)."""
    if payload.exception() is None:
        payload.set_exception(_CLOSED)
