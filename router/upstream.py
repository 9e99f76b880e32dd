"""The HTTP client to providers and engines: aiohttp behind the small interface the pipeline uses.

`UpstreamPool.request(target, method, path, headers, body, timeouts)` returns once the response
headers are in; the body is read with `read()` (capped, default 64 MiB) or `chunks()` (as it
arrives, with back-pressure), and `release()` gives the connection back. aiohttp does the protocol:
llhttp's C parser, every legal framing (Content-Length, chunked, close-delimited), gzip/deflate,
forward proxies (CONNECT for https), TLS, DNS caching, pooled keep-alive with expiry and a cap
per upstream. What stays ours: the four timeouts (connect, first byte, read gap, total), one retry
of a stale pooled connection, refusing header values with line breaks, typed errors whose messages
name the upstream or proxy but never credentials. Proxies are chosen per target (router/proxies.py).

Why aiohttp and how it is tuned for the hot path (docs/benchmarks.md has the figures): one
ClientSession per gateway with a DummyCookieJar and no auto headers; a yarl URL and a ClientTimeout
built once per (target, path) and per Timeouts, not per request; the body's fast path is one
`read()` when Content-Length says it fits.
"""
from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass
from typing import AsyncIterator

import aiohttp
from yarl import URL

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


_REUSED: contextvars.ContextVar[bool] = contextvars.ContextVar("cborg_upstream_reused", default=False)


class _Connector(aiohttp.TCPConnector):
    """Notes whether the connection a request got had served one before (for the stale retry)."""

    async def connect(self, req, traces, timeout):  # type: ignore[override]
        conn = await super().connect(req, traces, timeout)
        proto = conn.protocol
        reused = getattr(proto, "_cborg_used", False)
        if not reused:
            proto._cborg_used = True  # type: ignore[union-attr]
        _REUSED.set(reused)
        return conn


def _where(target: Target) -> str:
    return f"{target.host}:{target.port}" + (f" through the proxy {target.proxy.label}" if target.proxy else "")


def _convert(e: BaseException, target: Target, t: Timeouts, phase: str) -> UpstreamError:
    """An aiohttp (or OS) exception as one of ours. phase: 'head' before the headers, 'body' after."""
    if isinstance(e, aiohttp.ConnectionTimeoutError):
        return ConnectTimeout(f"upstream timed out (connect after {t.connect:g} s) connecting to {_where(target)}")
    if isinstance(e, aiohttp.SocketTimeoutError):
        if phase == "head":
            return UpstreamTimeout(f"upstream timed out (waiting for the first byte after {t.first_byte:g} s)")
        return UpstreamTimeout(f"upstream timed out (reading the body after {t.read:g} s of silence)")
    if isinstance(e, asyncio.TimeoutError):
        return UpstreamTimeout(f"upstream timed out (total after {t.total:g} s)")
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


class UpstreamResponse:
    """Status and headers of an upstream response; the body is read with read() or chunks()."""

    __slots__ = ("status", "_r", "_pool", "_target", "_timeouts", "_done")

    def __init__(self, r: aiohttp.ClientResponse, pool: "UpstreamPool", target: Target, timeouts: Timeouts):
        self.status = r.status
        self._r = r
        self._pool = pool
        self._target = target
        self._timeouts = timeouts
        self._done = False

    def header(self, name: str) -> str | None:
        return self._r.headers.get(name)

    @property
    def headers(self):
        """The response headers (a case-insensitive multidict)."""
        return self._r.headers

    async def read(self) -> bytes:
        """The whole body, up to the pool's cap (BodyTooLarge past it)."""
        r = self._r
        cap = self._pool.max_body
        try:
            n = r.content_length
            if n is not None and n <= cap and "Content-Encoding" not in r.headers:
                return await r.read()
            if n is not None and n > cap and "Content-Encoding" not in r.headers:
                raise BodyTooLarge(self._too_large(n))
            parts, size = [], 0
            content = r.content
            while True:
                data = await content.readany()
                if not data:
                    return b"".join(parts)
                size += len(data)
                if size > cap:
                    raise BodyTooLarge(self._too_large(None))
                parts.append(data)
        except UpstreamError:
            raise
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise _convert(e, self._target, self._timeouts, "body") from None
        finally:
            self.release()

    def _too_large(self, n: int | None) -> str:
        size = f"{n:,} bytes" if n is not None else "more"
        return (f"the upstream's response is too large ({size}; this gateway reads at most "
                f"{self._pool.max_body:,} bytes of a non-streamed answer: CBORG_UPSTREAM_MAX_BODY_BYTES)")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; reading pauses while the consumer is behind."""
        content = self._r.content
        try:
            while True:
                try:
                    data = await content.readany()
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                    raise _convert(e, self._target, self._timeouts, "body") from None
                if not data:
                    return
                yield data
        finally:
            self.release()

    def release(self) -> None:
        """Give the connection back to the pool if the body was read to its end, else close it."""
        if not self._done:
            self._done = True
            self._r.release()


class UpstreamPool:
    """One aiohttp ClientSession for the gateway: pooled keep-alive connections per upstream."""

    def __init__(self, max_body: int = DEFAULT_MAX_BODY, conns_per_host: int = DEFAULT_CONNS_PER_HOST,
                 keepalive_s: float = KEEPALIVE_S):
        self.max_body = max_body
        self._conns_per_host = conns_per_host
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[tuple, URL] = {}
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}
        self._proxies: dict[tuple[Proxy, str], tuple[URL, dict | None, tuple | None]] = {}

    def _open(self) -> aiohttp.ClientSession:
        connector = _Connector(limit=0, limit_per_host=self._conns_per_host, keepalive_timeout=self._keepalive_s,
                               ttl_dns_cache=60, enable_cleanup_closed=False)
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"), auto_decompress=True,
            read_bufsize=_READ_BUFSIZE, raise_for_status=False, timeout=aiohttp.ClientTimeout())
        return self._session

    def _url(self, target: Target, path: str) -> URL:
        k = (target, path)
        u = self._urls.get(k)
        if u is None:
            if len(self._urls) > 4096:     # paths with ids (stored responses): don't grow without bound
                self._urls.clear()
            u = self._urls[k] = URL(target.url(path), encoded=True)
        return u

    def _timeout(self, t: Timeouts) -> aiohttp.ClientTimeout:
        ct = self._timeouts.get(t)
        if ct is None:
            # sock_read is the first-byte wait until the headers; request() then sets the read gap.
            ct = self._timeouts[t] = aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect,
                                                           sock_read=t.first_byte)
        return ct

    def _proxy(self, p: Proxy, scheme: str) -> tuple[URL, dict | None, tuple | None]:
        """The proxy's URL, its headers for a CONNECT (https upstreams), and the Proxy-Authorization
        header to add to a plain-http request (which goes to the proxy in absolute form)."""
        got = self._proxies.get((p, scheme))
        if got is None:
            auth = aiohttp.encode_basic_auth(p.user, p.password or "") if p.user else None
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
        url = self._url(target, path)
        ct = self._timeout(timeouts)
        proxy = proxy_headers = None
        if target.proxy is not None:
            proxy, proxy_headers, auth_header = self._proxy(target.proxy, target.scheme)
            if auth_header is not None:
                hdrs.append(auth_header)
        m = method.decode()
        for attempt in (0, 1):
            _REUSED.set(False)
            try:
                r = await session.request(m, url, headers=hdrs, data=body, timeout=ct, allow_redirects=False,
                                          proxy=proxy, proxy_headers=proxy_headers)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                if attempt == 0 and _REUSED.get() and not isinstance(e, aiohttp.ClientConnectorError):
                    continue
                raise _convert(e, target, timeouts, "head") from None
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                raise _convert(e, target, timeouts, "head") from None
            if r.status == 407 and target.proxy is not None:     # a plain-http request the proxy refused
                r.release()
                raise ConnectError(f"the proxy {target.proxy.label} refused the request to {target.host}:"
                                   f"{target.port} (HTTP 407: its credentials are missing or wrong)")
            if timeouts.read != timeouts.first_byte and not r.content.is_eof():
                conn = r.connection
                if conn is not None and conn.protocol is not None:
                    conn.protocol.read_timeout = timeouts.read     # from now on, the gap between chunks
                    conn.protocol.start_timeout()
            return UpstreamResponse(r, self, target, timeouts)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
