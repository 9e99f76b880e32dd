"""Where an upstream is: a parsed base URL and the egress proxy (if any) that reaches it.

Kept apart from the transport (router/upstream.py) so that provider adapters, which resolve their
endpoints from models.yaml and the environment, never import the HTTP client.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP forward proxy. Its credentials stay out of repr(), logs and error messages: `label`
    (scheme://host:port) is what is shown."""

    url: str                                               # scheme://host:port, no credentials
    user: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, url: str) -> "Proxy":
        """`http://[user:password@]host[:port]`; a bare `host:port` means http (curl's reading)."""
        if "://" not in url:
            url = "http://" + url
        u = urlsplit(url)
        scheme = u.scheme.lower()
        try:
            port = u.port
        except ValueError:
            port = -1
        if scheme not in ("http", "https") or not u.hostname or port == -1:
            where = f"{scheme}://{u.hostname or ''}" if u.hostname else scheme + "://..."
            raise ValueError(f"not a usable proxy URL ({where}): the gateway speaks to http:// and https:// "
                             "forward proxies (not socks)")
        port = port or (443 if scheme == "https" else 1080)    # curl's defaults
        host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        return cls(f"{scheme}://{host}:{port}", unquote(u.username) if u.username else None,
                   unquote(u.password) if u.password else None)

    @property
    def label(self) -> str:
        return self.url


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed base URL; `path` is prefixed to each request path. `proxy`: the forward proxy to
    go through, None to connect directly."""

    scheme: str
    host: str
    port: int
    path: str
    host_header: bytes
    proxy: Proxy | None = None

    @classmethod
    def parse(cls, url: str, proxy: Proxy | None = None) -> "Target":
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = u.port or (443 if u.scheme == "https" else 80)
        default = (u.scheme == "https" and port == 443) or (u.scheme == "http" and port == 80)
        hh = u.hostname if default else f"{u.hostname}:{port}"
        if ":" in u.hostname:  # IPv6 literal
            hh = f"[{u.hostname}]" if default else f"[{u.hostname}]:{port}"
        return cls(u.scheme, u.hostname, port, u.path.rstrip("/"), hh.encode(), proxy)

    @property
    def key(self) -> tuple:
        return (self.scheme, self.host, self.port, self.proxy)

    def url(self, path: str = "") -> str:
        return f"{self.scheme}://{self.host_header.decode()}{self.path}{path}"
