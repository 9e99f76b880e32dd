"""A real OpenID provider on loopback for tests (the PyPI package oidc-provider-mock: discovery,
authorization code flow, RS256 ID tokens, a form where the test picks who signs in)."""
from __future__ import annotations

import contextlib
import threading
from urllib.parse import quote

import httpx
import pytest

from tests.helpers.servers import free_port

# oidc-provider-mock uses Authlib's deprecated JOSE and grant APIs: not ours to fix (pytestmark of its
# users). Authlib turns its own deprecation warnings on ("always") when authlib.deprecate is first
# imported: imported here, at collection, so that a test's filters come after it and win.
import authlib.deprecate  # noqa: E402,F401

QUIET = [pytest.mark.filterwarnings("ignore:authlib.jose module is deprecated"),
         pytest.mark.filterwarnings("ignore:get_jwt_config:DeprecationWarning")]


@contextlib.contextmanager
def oidc_provider():
    """Yields the issuer URL. Any client id and secret are accepted; PUT /users/<sub> sets claims."""
    import logging

    import oidc_provider_mock
    import werkzeug.serving

    logging.getLogger("werkzeug").setLevel(logging.WARNING)      # no request lines between the dots

    port = free_port()
    server = werkzeug.serving.make_server("127.0.0.1", port, oidc_provider_mock.app(), threaded=True)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        t.join(10)


def set_user(issuer: str, email: str, **claims) -> None:
    """The claims the provider gives for `email` (the subject the sign-in form is filled with)."""
    r = httpx.put(f"{issuer}/users/{quote(email)}", json={"email": email, **claims}, timeout=10)
    assert r.status_code == 204, r.text


def sign_in(client: httpx.Client, gateway_url: str, email: str) -> httpx.Response:
    """The whole code flow as a browser does it, without one: the gateway's redirect, the
    provider's form posted with `email` as the subject, the way back. Returns the last answer."""
    r = client.get(gateway_url + "/key/manage/login")
    assert r.status_code in (302, 303, 307), r.text
    r = httpx.post(r.headers["location"], data={"sub": email}, timeout=10)
    assert r.status_code in (302, 303), r.text
    return client.get(r.headers["location"], follow_redirects=True)
