"""Which egress proxy reaches an upstream: models.yaml's `proxy:` or the environment, read as curl
reads it.

- `https_proxy`/`HTTPS_PROXY` for https upstreams, `http_proxy`/`HTTP_PROXY` for http ones, else
  `all_proxy`/`ALL_PROXY` (lower case first; curl reads only the lower-case `http_proxy`, but
  httpx, requests and most lab set-ups use either). A bare `host:port` means http://, port 1080.
- `no_proxy`/`NO_PROXY`: comma- or space-separated; `*` alone bypasses every host; a name matches
  itself and its subdomains (`lbl.gov`, `.lbl.gov` and `*.lbl.gov` all match `api.lbl.gov`, not
  `notlbl.gov`); IP addresses match exactly or by CIDR (`10.0.0.0/8`); an entry with a port
  (`host:8080`) matches that port only.
- Local inference nodes (providers with `local: true`, node URLs) go direct unless models.yaml
  names a proxy for them.
Pure functions of an environment mapping: no I/O.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from .targets import Proxy, Target

DIRECT = "direct"      # models.yaml: `proxy: direct` never uses a proxy, whatever the environment says


def _var(env: Mapping[str, str], name: str) -> str | None:
    v = env.get(name.lower())
    if v is None:
        v = env.get(name.upper())
    v = (v or "").strip()
    return v or None


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def bypassed(host: str, port: int, no_proxy: str | None) -> bool:
    """Whether NO_PROXY's list names this host (and port)."""
    if not no_proxy:
        return False
    host = host.lower().rstrip(".").strip("[]")
    addr = _ip(host)
    for entry in no_proxy.replace(",", " ").split():
        entry = entry.lower()
        if entry == "*":
            return True
        want_port = None
        if entry.startswith("["):                      # [v6]:port or [v6]
            close = entry.find("]")
            if close < 0:
                continue
            if entry[close + 1:].startswith(":") and entry[close + 2:].isdigit():
                want_port = int(entry[close + 2:])
            entry = entry[1:close]
        elif entry.count(":") == 1:                    # name:port or v4:port (a v6 address has several)
            name, _, p = entry.partition(":")
            if not p.isdigit():
                continue
            entry, want_port = name, int(p)
        if want_port is not None and want_port != port:
            continue
        if addr is not None:
            try:
                if addr in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        if entry.startswith("*."):
            entry = entry[1:]
        entry = entry.lstrip(".").rstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


def from_env(target: Target, env: Mapping[str, str]) -> Proxy | None:
    """The proxy the environment names for this upstream, or None. Raises ValueError for a proxy URL
    the gateway cannot use (socks); its message names the variable, never the credentials."""
    if bypassed(target.host, target.port, _var(env, "no_proxy")):
        return None
    for name in (f"{target.scheme}_proxy", "all_proxy"):
        url = _var(env, name)
        if url:
            try:
                return Proxy.parse(url)
            except ValueError as e:
                raise ValueError(f"{name.upper()}: {e}") from None
    return None


def choose(target: Target, configured: str | None, local: bool, env: Mapping[str, str]) -> Target:
    """The target with the proxy that reaches it: models.yaml's `proxy:` (a URL or `direct`) wins,
    then the environment, except for local nodes (direct unless configured)."""
    if configured == DIRECT or (configured is None and local):
        proxy = None
    elif configured is not None:
        proxy = Proxy.parse(configured)
    else:
        proxy = from_env(target, env)
    return target if proxy == target.proxy else Target(target.scheme, target.host, target.port, target.path,
                                                        target.host_header, proxy)
