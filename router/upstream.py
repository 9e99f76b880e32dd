"""The HTTP client to providers and engines: aiohttp behind the small interface the pipeline uses.

`UpstreamPool.request(target, method, path, headers, body, timeouts)` returns once the response
headers are in; the body is read with `read()` (capped, default 64 MiB) or `chunks()` (as it
arrives, with back-pressure), and `release()` gives the connection back. aiohttp does the protocol:
llhttp's C parser, every legal framing (Content-Length, chunked, close-delimited), gzip/deflate,
forward proxies (CONNECT for https), TLS, DNS caching, pooled keep-alive with expiry and a cap
per upstream. What stays ours: the four timeouts (connect, first byte, read gap, total), one retry
of a stale pooled connection, refusing header values with line breaks, typed errors whose messages
name the upstream or proxy but never credentials. The proxy is part of the Target (router/proxies.py).

Cost (docs/benchmarks.md, "Upstream transport"): the hand-written httptools client this replaces
spent about 35 us of CPU per request; aiohttp's ClientSession.request about 170 us, httpx about
2,200 us. So requests go through aiohttp's lower layers as ClientSession._request does (ClientRequest,
the connector, ClientResponse) without what a gateway does not use per request (cookies, redirects,
auth, middlewares, traces, proxy lookup in the environment), and the timeouts ride on the coarse
timer wheel (common/timers.py) instead of an event-loop timer per request and per chunk: about
25 % less than session.request in the same process. Still, on one core, the gateway does fewer requests/s than
with the old client (the issue's 0.7 of its throughput is not reached; see the benchmark).
"""
from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import AsyncIterator

import aiohttp
from aiohttp.connector import Connection
from multidict import istr
from yarl import URL

from common import timers
from common.bounded import BoundedDict

from .targets import Proxy, Target

DEFAULT_MAX_BODY = 64 << 20          # non-streamed bodies past this are refused (a 502)
DEFAULT_CONNS_PER_HOST = 1024        # open connections per upstream (and proxy); more requests wait
KEEPALIVE_S = 30.0                   # an idle pooled connection older than this is closed, not reused
_READ_BUFSIZE = 1 << 19              # a streamed body pauses the socket past 2x this unread
_SKIP = frozenset(istr(h) for h in ("User-Agent", "Accept", "Accept-Encoding"))  # only what providers set goes out


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
    if isinstance(e, aiohttp.ClientResponseError):
        return ProtocolError(f"malformed response from upstream: {e.message}")
    return ProtocolError(f"upstream request failed: {type(e).__name__}: {e}")


def _os_reason(e: aiohttp.ClientConnectorError) -> str:
    err = e.os_error
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


class _Watch:
    """The timeouts of one exchange, on coarse timers (common/timers.py: no event-loop timer per
    request). One that fires closes the connection; the read that was waiting then fails, and the
    error names the timeout instead of the close."""

    __slots__ = ("conn", "resp", "fired", "total", "gap")

    def __init__(self) -> None:
        self.conn: Connection | None = None
        self.resp: aiohttp.ClientResponse | None = None
        self.fired: str | None = None
        self.total: timers.Timeout | None = None
        self.gap: timers.Timeout | None = None

    def fire(self, what: str) -> None:
        if self.fired is None:
            self.fired = what
            if self.resp is not None:
                self.resp.close()          # fails the body's pending read, closes the connection
            elif self.conn is not None:
                self.conn.close()          # fails the wait for the headers

    def cancel(self) -> None:
        if self.total is not None:
            self.total.cancel()
            self.total = None
        if self.gap is not None:
            self.gap.cancel()
            self.gap = None


class UpstreamResponse:
    """Status and headers of an upstream response; the body is read with read() or chunks()."""

    __slots__ = ("status", "_r", "_pool", "_target", "_timeouts", "_watch", "_done")

    def __init__(self, r: aiohttp.ClientResponse, pool: "UpstreamPool", target: Target, timeouts: Timeouts,
                 watch: _Watch):
        self.status = r.status
        self._r = r
        self._pool = pool
        self._target = target
        self._timeouts = timeouts
        self._watch = watch
        self._done = False

    def header(self, name: str) -> str | None:
        return self._r.headers.get(name)

    @property
    def headers(self):
        """The response headers (a case-insensitive multidict)."""
        return self._r.headers

    async def _next(self) -> bytes:
        """The next piece of the body (b"" at its end), within the read gap."""
        content = self._r.content
        w = self._watch
        w.gap = timers.call_later(self._timeouts.read, w.fire, "read")
        try:
            return await content.readany()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise _convert(e, self._target, self._timeouts, w.fired) from None
        finally:
            w.gap.cancel()
            w.gap = None

    async def read(self) -> bytes:
        """The whole body, up to the pool's cap (BodyTooLarge past it)."""
        r = self._r
        cap = self._pool.max_body
        try:
            n = r.content_length
            plain = "Content-Encoding" not in r.headers
            if n is not None and n > cap and plain:
                raise BodyTooLarge(self._too_large(n))
            if n is not None and plain and r.content.is_eof():
                return await r.read()                      # all there already: the common case
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
        if not self._done:
            self._done = True
            self._watch.cancel()
            self._r.release()


class UpstreamPool:
    """One aiohttp connector (pooled keep-alive connections per upstream and proxy) for the gateway."""

    def __init__(self, max_body: int = DEFAULT_MAX_BODY, conns_per_host: int = DEFAULT_CONNS_PER_HOST,
                 keepalive_s: float = KEEPALIVE_S):
        self.max_body = max_body
        self._conns_per_host = conns_per_host
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self._connector: aiohttp.TCPConnector | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._urls: dict[tuple, URL] = BoundedDict(4096)   # paths with ids (stored responses) vary
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._proxies: dict[tuple[Proxy, str], tuple[URL, dict | None, tuple | None]] = {}

    def _open(self) -> aiohttp.ClientSession:
        self._loop = asyncio.get_running_loop()
        self._connector = aiohttp.TCPConnector(limit=0, limit_per_host=self._conns_per_host,
                                               keepalive_timeout=self._keepalive_s, ttl_dns_cache=60)
        # The session owns the connector and gives responses their context; requests are made with
        # its lower layers (ClientRequest, the connector, the response) — see request().
        self._session = aiohttp.ClientSession(connector=self._connector, cookie_jar=aiohttp.DummyCookieJar(),
                                              trust_env=False, auto_decompress=True, read_bufsize=_READ_BUFSIZE)
        return self._session

    def _url(self, target: Target, path: str) -> URL:
        k = (target, path)
        u = self._urls.get(k)
        if u is None:
            u = self._urls[k] = URL(target.url(path), encoded=True)
        return u

    def _connect_timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        ct = self._timeouts.get(seconds)
        if ct is None:
            # connect: waiting for a free connection (limit per host) and opening one, proxy and TLS included
            ct = self._timeouts[seconds] = aiohttp.ClientTimeout(connect=seconds, sock_connect=seconds)
        return ct

    def _proxy(self, p: Proxy, scheme: str) -> tuple[URL, dict | None, tuple | None]:
        """The proxy's URL, its headers for a CONNECT (https upstreams), and the Proxy-Authorization
        header to add to a plain-http request (which goes to the proxy in absolute form)."""
        got = self._proxies.get((p, scheme))
        if got is None:
            auth = None
            if p.user:
                auth = "Basic " + base64.b64encode(f"{p.user}:{p.password or ''}".encode()).decode()
            if scheme == "https":
                got = (URL(p.url), {"Proxy-Authorization": auth} if auth else None, None)
            else:
                got = (URL(p.url), None, ("Proxy-Authorization", auth) if auth else None)
            self._proxies[(p, scheme)] = got
        return got

    async def request(self, target: Target, method: bytes, path: str, headers: list[tuple[bytes, bytes]],
                      body: bytes = b"", timeouts: Timeouts = Timeouts()) -> UpstreamResponse:
        """Send one request; returns once the response headers are in.

        A pooled connection that turns out dead before any response byte is retried once on a
        new one (the server closed an idle keep-alive connection; nothing was processed).
        """
        hdrs = []
        for k, v in headers:
            if b"\r" in v or b"\n" in v or b"\r" in k or b"\n" in k:
                raise ValueError(f"header {k!r} has a line break")
            hdrs.append((k.decode("latin-1"), v.decode("latin-1")))
        session = self._session or self._open()
        connector = self._connector
        assert connector is not None
        url = self._url(target, path)
        ct = self._connect_timeout(timeouts.connect)
        proxy = proxy_headers = None
        if target.proxy is not None:
            proxy, proxy_headers, auth_header = self._proxy(target.proxy, target.scheme)
            if auth_header is not None:
                hdrs.append(auth_header)
        m = method.decode()
        w = _Watch()
        w.total = timers.call_later(timeouts.total, w.fire, "total")
        try:
            for attempt in (0, 1):
                # aiohttp's lower layers, as ClientSession._request uses them, without what a gateway
                # does not need per request (cookies, redirects, auth, middlewares, traces, env proxies):
                # about 25 % less CPU per request than session.request (docs/benchmarks.md).
                req = aiohttp.ClientRequest(m, url, headers=hdrs, data=body, loop=self._loop, session=session,
                                            skip_auto_headers=_SKIP, proxy=proxy, proxy_headers=proxy_headers)
                try:
                    conn = await connector.connect(req, [], ct)
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                    raise _convert(e, target, timeouts, w.fired) from None
                proto = conn.protocol
                assert proto is not None
                reused = getattr(proto, "_cborg_used", False)
                if not reused:
                    proto._cborg_used = True  # type: ignore[attr-defined]
                proto.set_response_params(skip_payload=m == "HEAD", read_until_eof=True, auto_decompress=True,
                                          read_bufsize=_READ_BUFSIZE)
                w.conn = conn
                w.gap = timers.call_later(timeouts.first_byte, w.fire, "first byte")
                try:
                    r = await req.send(conn)
                    try:
                        await r.start(conn)
                    except BaseException:
                        r.close()
                        raise
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError) as e:
                    conn.close()
                    if attempt == 0 and reused and w.fired is None:
                        continue                    # a stale pooled connection: once more on a new one
                    raise _convert(e, target, timeouts, w.fired) from None
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                    conn.close()
                    raise _convert(e, target, timeouts, w.fired) from None
                except BaseException:
                    conn.close()
                    raise
                finally:
                    w.gap.cancel()
                    w.gap = None
                if r.status == 407 and target.proxy is not None:     # a plain-http request the proxy refused
                    r.release()
                    raise ConnectError(f"the proxy {target.proxy.label} refused the request to {target.host}:"
                                       f"{target.port} (HTTP 407: its credentials are missing or wrong)")
                w.resp = r
                return UpstreamResponse(r, self, target, timeouts, w)
            raise AssertionError("unreachable")
        except BaseException:
            w.cancel()
            raise

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
