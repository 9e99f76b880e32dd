"""Limits, budgets and cost through real gateways: one in-process, and replicas sharing Redis and PostgreSQL."""
from __future__ import annotations

import asyncio
import time
from datetime import datetime

import httpx
import openai
import pytest

from tests.conftest import MASTER_KEY, admin_new_key, gateway_replicas, running_gateway
from tests.mocks.openai_mock import Scripted

CHAT = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hello there"}]}


async def burst(urls: list[str], key: str, n: int, body: dict = CHAT) -> list[httpx.Response]:
    """n requests at once, spread over the replicas' URLs."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as c:
        return await asyncio.gather(*[
            c.post(urls[i % len(urls)] + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json=body) for i in range(n)])


def test_parallel_5_of_50_in_process(tmp_path, fresh_mock):
    fresh_mock.delay = 0.5
    with running_gateway(tmp_path, fresh_mock) as gw:
        key = gw.new_key(max_parallel_requests=5)
        rs = asyncio.run(burst([gw.url], key, 50))
        time.sleep(1.0)                                 # a ledger flush
        rows = gw.run(gw.gw.store.ledger_rows())
    codes = [r.status_code for r in rs]
    assert len(rs) == 50 and set(codes) <= {200, 429}          # every request answered: none lost
    assert fresh_mock.max_active <= 5
    assert codes.count(200) >= 5 and codes.count(200) + codes.count(429) == 50
    for r in rs:
        if r.status_code == 429:
            err = r.json()["error"]
            assert "parallel" in err["message"] and "5" in err["message"] and err["code"] == "rate_limit_exceeded"
            assert r.headers["retry-after"] == "1"
    assert len(fresh_mock.requests) == codes.count(200)
    assert len(rows) == 50                                # one row per request, refusals included
    refused = [r for r in rows if r["status"] == 429]
    assert len(refused) == codes.count(429)
    assert all(r["cost"] == 0 and r["prompt_tokens"] == 0 and r["completion_tokens"] == 0 for r in refused)
    assert sum(r["cost"] for r in rows) == pytest.approx(sum(float(r.headers["x-litellm-response-cost"])
                                                             for r in rs if r.status_code == 200))


def test_on_premises_models_default_to_5_parallel_per_user(tmp_path, fresh_mock):
    """The CBorg docs' limit, from models.yaml's defaults: no key setting needed; aliases count too."""
    fresh_mock.delay = 0.5
    with running_gateway(tmp_path, fresh_mock) as gw:
        key = gw.new_key("onprem@lbl.gov")
        body = {"model": "lbl/cborg-chat:latest", "messages": [{"role": "user", "content": "hi"}]}
        rs = asyncio.run(burst([gw.url], key, 12, body))
    codes = [r.status_code for r in rs]
    assert codes.count(200) == 5 and codes.count(429) == 7, codes
    assert fresh_mock.max_active == 5
    msg = next(r for r in rs if r.status_code == 429).json()["error"]["message"]
    assert "user onprem@lbl.gov on lbl/llama" in msg and "5 in flight" in msg


def test_parallel_slots_come_back_after_disconnects_and_failures(tmp_path, fresh_mock):
    """A client that leaves mid-stream, a stream the upstream cuts, an upstream error: none keeps its slot."""
    with running_gateway(tmp_path, fresh_mock) as gw:
        key = gw.new_key(max_parallel_requests=1)
        h = {"Authorization": f"Bearer {key}"}
        fresh_mock.chunk_delay = 0.3
        with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=h,
                          json={**CHAT, "stream": True, "messages": [{"role": "user", "content": "a b c d e f g"}]}) as r:
            next(r.iter_lines())                            # one chunk, then the client goes away
        fresh_mock.chunk_delay = 0.0
        fresh_mock.script.append(Scripted(cut_after=2))
        httpx.post(gw.url + "/v1/chat/completions", headers=h, json={**CHAT, "stream": True})
        fresh_mock.script.append(Scripted(400, {"error": {"message": "bad", "type": "invalid_request_error"}}))
        assert httpx.post(gw.url + "/v1/chat/completions", headers=h, json=CHAT).status_code == 400
        deadline = time.time() + 3
        while True:
            r = httpx.post(gw.url + "/v1/chat/completions", headers=h, json=CHAT)
            if r.status_code == 200 or time.time() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 200, r.text
        time.sleep(1.0)                                     # a ledger flush
        statuses = [x["status"] for x in gw.run(gw.gw.store.ledger_rows())]
        assert 499 in statuses and 502 in statuses and 400 in statuses, statuses   # each recorded as it ended


def test_parallel_5_of_50_across_two_replicas(tmp_path, fresh_mock, pg_url, redis_url, redis_prefix):
    fresh_mock.delay = 0.5
    env = {"CBORG_DATABASE_URL": pg_url, "CBORG_REDIS_URL": redis_url, "CBORG_REDIS_PREFIX": redis_prefix}
    with gateway_replicas(tmp_path, fresh_mock, 2, env) as urls:
        key = admin_new_key(urls[0], user_id="par@lbl.gov", max_parallel_requests=5)
        time.sleep(2.5)   # the other replica learns the key from the shared database
        rs = asyncio.run(burst(urls, key, 50))
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 429}, [r.text for r in rs if r.status_code not in (200, 429)][:2]
        assert fresh_mock.max_active <= 5, fresh_mock.max_active
        assert codes.count(200) >= 5
        by_replica = {u: [r.status_code for r in rs if str(r.url).startswith(u)] for u in urls}
        assert all(429 in v for v in by_replica.values()), by_replica
        # one limit across both: 3 slow requests held on replica A leave B exactly 2 slots
        fresh_mock.delay = 1.5

        async def split():
            held = asyncio.ensure_future(burst([urls[0]], key, 3))
            await asyncio.sleep(0.5)
            on_b = await burst([urls[1]], key, 3)
            return await held, on_b
        on_a, on_b = asyncio.run(split())
        assert [r.status_code for r in on_a] == [200] * 3
        assert sorted(r.status_code for r in on_b) == [200, 200, 429]


def test_rate_limit_headers_and_sdk_error(tmp_path, fresh_mock):
    with running_gateway(tmp_path, fresh_mock) as gw:
        key = gw.new_key(rpm_limit=3, tpm_limit=100000)
        c = openai.OpenAI(api_key=key, base_url=gw.url, max_retries=0)
        raw = c.chat.completions.with_raw_response.create(**CHAT)
        h = raw.headers
        assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "2"
        assert h["x-ratelimit-limit-tokens"] == "100000" and int(h["x-ratelimit-remaining-tokens"]) < 100000
        assert h["x-ratelimit-reset-requests"].endswith("s") and h["x-ratelimit-reset-tokens"].endswith("s")
        c.chat.completions.create(**CHAT)
        c.chat.completions.create(**CHAT)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(**CHAT)
        assert "3 requests per minute" in str(e.value)
        assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
        # streaming responses carry the headers too
        k2 = gw.new_key(rpm_limit=10)
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {k2}"},
                       json={**CHAT, "stream": True})
        assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == "9"


def test_budget_crossed_mid_stream_stops_next_request_not_current(tmp_path, fresh_mock):
    fresh_mock.stream_words = 5
    with running_gateway(tmp_path, fresh_mock) as gw:
        key = gw.new_key("budget@lbl.gov", max_budget=0.0002)
        c = openai.OpenAI(api_key=key, base_url=gw.url, max_retries=0)
        long_msg = "word " * 200                     # ~250 prompt tokens: $0.00125+ at gpt-4o prices
        chunks = list(c.chat.completions.create(model="openai/gpt-4o", stream=True,
                                                stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": long_msg}]))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text.startswith("echo: word")          # the crossing request finished whole
        cost = chunks[-1].usage.model_extra["cost"]
        assert cost > 0.0002
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(**CHAT)
        assert "Budget exceeded for key" in str(e.value) and "of the $0.0002 budget" in str(e.value)
        assert e.value.response.headers["x-should-retry"] == "false"
        # free models keep answering after the budget is spent
        r = c.chat.completions.create(model="lbl/cborg-chat:latest", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "echo: hi"
        raw = c.chat.completions.with_raw_response.create(model="lbl/llama", messages=[{"role": "user", "content": "x"}])
        assert float(raw.headers["x-litellm-response-cost"]) == 0.0
        # spend is visible and recorded, free tokens counted with zero cost
        time.sleep(0.8)
        info = httpx.get(gw.url + "/key/info", headers={"Authorization": f"Bearer {key}"}).json()["info"]
        assert info["spend"] == pytest.approx(cost) and info["max_budget"] == 0.0002
        rows = gw.run(gw.gw.store.ledger_rows())
        free = [r for r in rows if r["model"].startswith("lbl/")]
        assert len(free) == 2 and all(r["cost"] == 0 and r["prompt_tokens"] > 0 for r in free)


def test_the_budget_hold_covers_the_priciest_fallback(tmp_path, fresh_mock):
    def fallback_to_o1(conf):
        for m in conf["models"]:
            if m["name"] == "openai/gpt-4o-mini":
                m["fallbacks"] = ["openai/o1"]
    ask = {**CHAT, "model": "openai/gpt-4o-mini", "max_tokens": 1000}
    fresh_mock.delay = 0.5                 # the first call still runs (and holds) when the second comes
    with running_gateway(tmp_path, fresh_mock, edit=fallback_to_o1) as gw:
        # gpt-4o-mini's 1,000 tokens cost at most $0.0007, o1's $0.06; o1 may serve it, so $0.06 is held
        # and a second call at once does not fit a $0.01 budget (with $0.0007 held, it did)
        key = gw.new_key("hold@lbl.gov", max_budget=0.01)
        got = sorted(r.status_code for r in gw.run(burst([gw.url], key, 2, ask)))
        assert got == [200, 429], got
        # a key that may not use the fallback holds only what gpt-4o-mini can cost
        key = gw.new_key("hold@lbl.gov", max_budget=0.01, models=["openai/gpt-4o-mini"])
        got = [r.status_code for r in gw.run(burst([gw.url], key, 2, ask))]
        assert got == [200, 200], got


def test_user_budget_default_and_user_info(tmp_path, fresh_mock):
    def edit(conf):
        conf["limits"] = {"user": {"budget": 0.0001, "budget_period": "30d"}}
    with running_gateway(tmp_path, fresh_mock, edit=edit) as gw:
        k1 = gw.new_key("ada@lbl.gov")
        k2 = gw.new_key("ada@lbl.gov")               # the user's budget covers all their keys
        c1 = openai.OpenAI(api_key=k1, base_url=gw.url, max_retries=0)
        c1.chat.completions.create(**{**CHAT, "messages": [{"role": "user", "content": "x " * 100}]})
        c2 = openai.OpenAI(api_key=k2, base_url=gw.url, max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            c2.chat.completions.create(**CHAT)
        assert "Budget exceeded for user ada@lbl.gov" in str(e.value)
        time.sleep(0.8)
        r = httpx.get(gw.url + "/user/info", headers={"Authorization": f"Bearer {k2}"})
        assert r.status_code == 200
        d = r.json()
        ui = d["user_info"]
        assert ui["user_id"] == "ada@lbl.gov" and ui["max_budget"] == 0.0001 and ui["spend"] > 0.0001
        reset = datetime.fromisoformat(ui["budget_reset_at"].replace("Z", "+00:00")).timestamp()
        assert reset > time.time() + 29 * 86400
        assert len(d["keys"]) == 2 and k1 not in r.text
        assert httpx.get(gw.url + "/user/info?user_id=other@lbl.gov",
                         headers={"Authorization": f"Bearer {k2}"}).status_code == 403
        assert gw.admin("GET", "/user/info?user_id=ada@lbl.gov").json()["user_info"]["spend"] > 0


def test_cost_calculate(gateway, api_key):
    h = {"Authorization": f"Bearer {api_key}"}
    for path in ("/cost/calculate", "/spend/calculate", "/v1/spend/calculate"):
        r = httpx.post(gateway.url + path, headers=h, json={"model": "openai/gpt-4o", "prompt_tokens": 1000,
                                                            "completion_tokens": 500, "cached_tokens": 200})
        assert r.status_code == 200
        assert r.json()["cost"] == pytest.approx((800 * 5 + 200 * 2.5 + 500 * 15) / 1e6)
    r = httpx.post(gateway.url + "/cost/calculate", headers=h, json={
        "model": "anthropic/claude-sonnet", "prompt_tokens": 1000, "completion_tokens": 0, "cached_tokens": 600,
        "cache_creation_input_tokens": 300})
    assert r.json()["cost"] == pytest.approx((100 * 3 + 600 * 0.3 + 300 * 3.75) / 1e6)
    r = httpx.post(gateway.url + "/cost/calculate", headers=h, json={
        "model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 100})
    d = r.json()
    assert d["estimated"] is True and 100 <= d["prompt_tokens"] <= 120 and d["completion_tokens"] == 100
    assert d["cost"] == pytest.approx((d["prompt_tokens"] * 0.165 + 100 * 0.66) / 1e6)
    assert httpx.post(gateway.url + "/cost/calculate", headers=h, json={"model": "lbl/llama",
                                                                        "prompt_tokens": 10**6}).json()["cost"] == 0
    assert httpx.post(gateway.url + "/cost/calculate", headers=h, json={"model": "nope"}).status_code == 404
    assert httpx.post(gateway.url + "/cost/calculate", headers=h, json={"messages": []}).status_code == 400
    assert httpx.post(gateway.url + "/cost/calculate", json={"model": "openai/gpt-4o"}).status_code == 401


def test_metrics_endpoint(gateway, api_key, fresh_mock):
    c = openai.OpenAI(api_key=api_key, base_url=gateway.url, max_retries=0)
    c.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "m"}])
    list(c.chat.completions.create(model="openai/gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "m"}]))
    lim = gateway.new_key(rpm_limit=0)
    httpx.post(gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {lim}"}, json=CHAT)
    text = httpx.get(gateway.url + "/metrics").text
    for name in ("cborg_requests_total", "cborg_request_latency_seconds_bucket", "cborg_time_to_first_token_seconds",
                 "cborg_tokens_total", "cborg_spend_usd_total", "cborg_in_flight_requests",
                 "cborg_limiter_rejections_total", "cborg_errors_total"):
        assert name in text, name
    assert 'cborg_requests_total{model="openai/gpt-4o-mini",status="200"}' in text
    assert 'cborg_limiter_rejections_total{limit="rpm",scope="key"}' in text
    assert 'cborg_tokens_total{kind="completion",model="openai/gpt-4o-mini"}' in text
    assert "cborg_in_flight_requests 0.0" in text
    assert api_key not in text


def test_ledger_equals_costs_returned(tmp_path, fresh_mock, pg_url):
    """Mixed streams and plain responses on PostgreSQL: the ledger's total is the sum clients saw."""
    with running_gateway(tmp_path, fresh_mock, db=pg_url) as gw:
        key = gw.new_key("ledger@lbl.gov")
        c = openai.OpenAI(api_key=key, base_url=gw.url, max_retries=0)
        seen = 0.0
        for i in range(6):
            msgs = [{"role": "user", "content": f"request number {i} " * (i + 1)}]
            raw = c.chat.completions.with_raw_response.create(model="openai/gpt-4.1", messages=msgs)
            seen += float(raw.headers["x-litellm-response-cost"])
            chunks = list(c.chat.completions.create(model="xai/grok", messages=msgs, stream=True,
                                                    stream_options={"include_usage": True}))
            seen += chunks[-1].usage.model_extra["cost"]
        deadline = time.time() + 5                  # flushes every 0.5 s; a loaded CI machine can be slower
        while True:
            time.sleep(0.5)
            n, total = gw.run(gw.gw.store.ledger_totals())
            if n >= 12 or time.time() > deadline:
                break
        assert n == 12 and total == pytest.approx(seen, rel=1e-9), (n, gw.gw.ledger.pending(), gw.gw.ledger.written)
        rows = gw.run(gw.gw.store.ledger_rows())
        r = rows[0]
        assert r["key_id"] and r["user_id"] == "ledger@lbl.gov" and r["provider"] in ("openai", "xai")
        assert r["served_model"] in ("gpt-4.1", "grok-3") and r["status"] == 200 and r["latency_ms"] > 0
        assert {x["stream"] for x in rows} == {True, False}
        info = httpx.get(gw.url + "/key/info", headers={"Authorization": f"Bearer {key}"}).json()["info"]
        assert info["spend"] == pytest.approx(seen, rel=1e-9)


def test_client_gone_frees_parallel_slot_and_cancels_upstream(tmp_path, fresh_mock):
    """A non-streaming request whose client gives up stops at once: its slot is free for the next one."""
    fresh_mock.delay = 3.0
    with running_gateway(tmp_path, fresh_mock) as gw:
        key = gw.new_key("gone@lbl.gov", max_parallel_requests=1)
        h = {"Authorization": f"Bearer {key}"}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gw.url + "/v1/chat/completions", headers=h, json=CHAT, timeout=0.5)
        time.sleep(0.3)
        fresh_mock.delay = 0.0
        t = time.time()
        r = httpx.post(gw.url + "/v1/chat/completions", headers=h, json=CHAT, timeout=10)
        assert r.status_code == 200, r.text
        assert time.time() - t < 1.0
        time.sleep(0.8)
        rows = gw.run(gw.gw.store.ledger_rows())
        assert sorted(x["status"] for x in rows) == [200, 499]


def test_user_limits_override_the_defaults(tmp_path, fresh_mock):
    """An admin raises one user's budget and caps their parallel requests: enforced at once, on every
    key of theirs; null puts a limit back to models.yaml's; other users keep the defaults."""
    def edit(conf):
        conf["limits"] = {"user": {"budget": 0.0001, "budget_period": "30d"}}
    fresh_mock.delay = 0.4
    with running_gateway(tmp_path, fresh_mock, edit=edit) as gw:
        k1, k2 = gw.new_key("grant@lbl.gov"), gw.new_key("grant@lbl.gov")
        other = gw.new_key("plain@lbl.gov")
        big = {**CHAT, "messages": [{"role": "user", "content": "x " * 100}]}
        for k in (k1, other):                       # each user spends past the default $0.0001
            assert httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {k}"},
                              json=big, timeout=30).status_code == 200
        time.sleep(0.8)
        r = gw.admin("POST", "/user/update", json={"user_id": "grant@lbl.gov", "max_budget": 500,
                                                   "max_parallel_requests": 2})
        assert r.status_code == 200, r.text
        ui = r.json()["user_info"]
        assert ui["max_budget"] == 500 and ui["max_parallel_requests"] == 2 and ui["budget_duration"] == "30d"
        assert ui["limits_set"] == {"max_budget": 500, "max_parallel": 2} and len(r.json()["keys"]) == 2
        rs = asyncio.run(burst([gw.url], k2, 4))   # the budget no longer refuses; 2 in flight at most
        assert sorted(x.status_code for x in rs) == [200, 200, 429, 429], [x.text for x in rs]
        assert "user grant@lbl.gov: the limit is 2 in flight" in next(x for x in rs if x.status_code == 429).text
        c = openai.OpenAI(api_key=other, base_url=gw.url, max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:   # other users: models.yaml's budget
            c.chat.completions.create(**CHAT)
        assert "Budget exceeded for user plain@lbl.gov" in str(e.value)
        info = httpx.get(gw.url + "/user/info", headers={"Authorization": f"Bearer {k1}"}).json()["user_info"]
        assert info["max_budget"] == 500 and info["max_parallel_requests"] == 2
        # back to the default budget: refused again
        assert gw.admin("POST", "/user/update", json={"user_id": "grant@lbl.gov", "budget": None}).status_code == 200
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {k1}"}, json=CHAT)
        assert r.status_code == 429 and "Budget exceeded for user grant@lbl.gov" in r.text
        # bad input: a clear 400, a 401 without the master key
        for body, field in (({"max_budget": 5}, "user_id"), ({"user_id": "grant@lbl.gov", "rpm_limit": -1}, "rpm_limit"),
                            ({"user_id": "grant@lbl.gov", "max_budget": "lots"}, "max_budget"),
                            ({"user_id": "grant@lbl.gov", "budget_duration": "monthly"}, "budget_duration"),
                            ({"user_id": "grant@lbl.gov", "models": ["x"]}, "models")):
            r = gw.admin("POST", "/user/update", json=body)
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == field and err["message"].startswith(field), (body, r.text)
        assert httpx.post(gw.url + "/user/update", headers={"Authorization": f"Bearer {k1}"},
                          json={"user_id": "grant@lbl.gov", "max_budget": 1e9}).status_code == 401


def test_user_limits_reach_every_replica(tmp_path, fresh_mock, pg_url, redis_url, redis_prefix):
    """Set through one replica (or `cborg users update`), applied by the other within its key poll."""
    import os
    import subprocess
    import sys
    fresh_mock.delay = 0.5
    env = {"CBORG_DATABASE_URL": pg_url, "CBORG_REDIS_URL": redis_url, "CBORG_REDIS_PREFIX": redis_prefix}
    with gateway_replicas(tmp_path, fresh_mock, 2, env) as urls:
        key = admin_new_key(urls[0], user_id="two@lbl.gov")
        r = httpx.post(urls[0] + "/user/update", headers={"Authorization": f"Bearer {MASTER_KEY}"},
                       json={"user_id": "two@lbl.gov", "max_parallel_requests": 1})
        assert r.status_code == 200, r.text
        time.sleep(3.0)                                     # the other replica's key poll (2 s)
        assert sorted(x.status_code for x in asyncio.run(burst([urls[1]], key, 3))) == [200, 429, 429]
        cli = subprocess.run([sys.executable, "-m", "cborg.cli", "users", "update", "two@lbl.gov", "--parallel", "3"],
                             env={**os.environ, "CBORG_DATABASE_URL": pg_url}, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0 and '"max_parallel": 3' in cli.stdout, cli.stderr
        ui = httpx.get(urls[1] + "/user/info?user_id=two@lbl.gov", headers={"Authorization": f"Bearer {MASTER_KEY}"})
        assert ui.json()["user_info"]["max_parallel_requests"] == 3     # what applies once the poll has it
        time.sleep(3.0)
        assert sorted(x.status_code for x in asyncio.run(burst(urls, key, 4))) == [200, 200, 200, 429]
