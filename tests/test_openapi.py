"""The OpenAPI document against a live gateway: Schemathesis sends what the document allows (and
what it does not), admin routes with the master key, inference routes with a key and the
loopback provider mocks upstream. No answer may be a server error of the gateway's own, and every
answer must match its documented status, content type and schema."""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

from tests.conftest import MASTER_KEY, running_gateway
from tests.providers.conftest import mocks  # noqa: F401 - fixture

# The hot path may pass on an upstream's 5xx (documented); the mock upstream never sends one unasked.
_ADMIN = ("/key/", "/user/update", "/admin/")


@pytest.fixture(scope="module")
def live(tmp_path_factory, mocks):
    """Every provider family configured, each pointed at its loopback mock."""
    with running_gateway(tmp_path_factory.mktemp("openapi"), mocks.openai, env=mocks.env()) as g:
        g.key = g.new_key("schemathesis@lbl.gov")
        yield g


def _operations(url: str):
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    return [r.ok() for r in schema.get_all_operations()]


def test_every_endpoint_matches_its_document(live):
    # (Schemathesis's pytest plugin does not run under pytest 9; its strategies are driven here.)
    ops = _operations(live.url)
    assert len(ops) >= 25
    for op in ops:
        admin = op.path.startswith(_ADMIN) and op.path != "/key/info"
        headers = {"Authorization": f"Bearer {MASTER_KEY if admin else live.key}"}

        @given(case=op.as_strategy(generation_mode=GenerationMode.POSITIVE)
               | op.as_strategy(generation_mode=GenerationMode.NEGATIVE))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(base_url=live.url, headers=headers,
                                   checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                           response_schema_conformance])
        check()


def test_docs_are_served_without_a_cdn(live):
    page = httpx.get(live.url + "/docs")
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower() and "http://" not in page.text.replace(live.url, "")
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
        r = httpx.get(live.url + asset)
        assert r.status_code == 200 and len(r.content) > 10_000, asset
    doc = httpx.get(live.url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/key/generate",
                 "/key/update", "/key/info", "/user/info", "/user/update", "/model/info", "/cost/calculate",
                 "/admin/models/swap", "/health/readiness", "/metrics"):
        assert path in doc["paths"], path
    # the server's own answers before any route (common/server.py) are documented on the inference paths
    assert {"408", "503"} <= set(doc["paths"]["/v1/chat/completions"]["post"]["responses"])
    landing = httpx.get(live.url + "/")
    assert landing.status_code == 200 and 'href="/docs"' in landing.text and 'href="/key/manage"' in landing.text
    evil = httpx.get(live.url + "/", headers={"host": "x<script>alert(1)</script>"})
    assert "<script>alert" not in evil.text


def test_unknown_paths_and_methods_are_openai_errors(live):
    r = httpx.get(live.url + "/no/such/path")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.delete(live.url + "/key/generate", headers={"Authorization": f"Bearer {MASTER_KEY}"})
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.post(live.url + "/key/generate", headers={"Authorization": f"Bearer {MASTER_KEY}"},
                   content=b"x" * (2 << 20))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
