"""What a client is told when an upstream fails: OpenAI-shaped errors from upstream statuses and
transport failures.

- The upstream's status is kept (the openai SDK picks its exception class by it), except 401/403:
  those mean the *gateway's* provider credentials were refused, and passing them through would
  tell the researcher that their own CBorg key is bad. They become 502 `upstream_auth_error`.
- The upstream's own `code` and `param` are kept where it gives them as strings (OpenAI's
  `context_length_exceeded`, `unsupported_parameter`, ...): client code branches on them.
- 5xx answers carry `x-should-retry: false`: the gateway has already retried.
- Messages are scrubbed of credentials; the provider key never reaches a client.
"""
from __future__ import annotations

import orjson

from common.asgi import NO_RETRY, HTTPError

from .catalog import Route
from .providers.base import Endpoint, scrub
from .upstream import ConnectError, UpstreamError, UpstreamTimeout



def _code_and_param(data: bytes) -> tuple[str | None, str | None]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None, None
    err = obj.get("error") if type(obj) is dict else None
    if type(err) is not dict:
        return None, None
    code, param = err.get("code"), err.get("param")
    return (code if type(code) is str else None), (param if type(param) is str else None)


def from_response(status: int, data: bytes, retry_after: str | None, message: str,
                  route: Route, ep: Endpoint) -> HTTPError:
    """The error for an upstream's non-2xx answer; `message` is the adapter's reading of `data`."""
    msg = scrub(message, ep.api_key)
    who = route.provider_name
    if status in (401, 403):
        return HTTPError(502, f"{who} refused this gateway's credentials for '{route.name}' (HTTP {status}): "
                              f"{msg}. Your API key is fine; the gateway's {who} configuration needs fixing.",
                         code="upstream_auth_error", type="upstream_error", headers=[NO_RETRY])
    code, param = _code_and_param(data)
    if retry_after and status in (429, 503):
        headers = [(b"retry-after", retry_after.encode())]   # e.g. a provider's rate limit, an engine's full queue
    else:
        headers = [NO_RETRY] if status >= 500 else []
    return HTTPError(status, f"{who} returned HTTP {status} for '{route.name}': {msg}",
                     code=code or "upstream_error", param=param,
                     type="upstream_error" if status >= 500 else None, headers=headers)


def from_transport(e: UpstreamError, route: Route, ep: Endpoint) -> HTTPError:
    """Timeouts are 504, everything else that kept an answer from arriving is 502."""
    msg = scrub(str(e), ep.api_key)
    if isinstance(e, UpstreamTimeout):
        return HTTPError(504, f"The upstream for '{route.name}' timed out: {msg}", code="upstream_timeout",
                         type="timeout_error", headers=[NO_RETRY])
    if isinstance(e, ConnectError):
        return HTTPError(502, f"The upstream for '{route.name}' is unreachable: {msg}", code="upstream_unreachable",
                         type="upstream_error", headers=[NO_RETRY])
    return HTTPError(502, f"The upstream for '{route.name}' failed: {msg}", code="upstream_error",
                     type="upstream_error", headers=[NO_RETRY])
