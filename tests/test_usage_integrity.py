"""Usage from an upstream is checked before it is priced or written (router/accounting/usage.py), and
a ledger row the database refuses is quarantined, never holding back the rows behind it.

Issue 14 item 1: one upstream reporting `prompt_tokens: 10**19` made every later ledger flush fail
(SQLite: "Python int too large", PostgreSQL: "out of int64 range"), and negative counts lowered spend.
"""
from __future__ import annotations

import logging

import httpx
import pytest

from router.accounting.ledger import LEDGER_COLUMNS
from router.accounting.usage import MAX_TOKENS, valid_usage
from tests.conftest import running_gateway
from tests.mocks.openai_mock import Scripted

CHAT = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hello"}]}

ABSURD = [
    {"prompt_tokens": 10**19, "completion_tokens": 5, "total_tokens": 10**19 + 5},
    {"prompt_tokens": 10, "completion_tokens": -10**9, "total_tokens": -10**9 + 10},
    {"prompt_tokens": -3, "completion_tokens": 2.5, "prompt_tokens_details": {"cached_tokens": 10**30}},
    {"prompt_tokens": "many", "completion_tokens": None, "prompt_tokens_details": "x"},
]


def _no_user_budget(conf: dict) -> None:
    conf["limits"]["user"] = {}       # a clamped count still costs hundreds of dollars


def test_valid_usage_clamps_and_names_the_upstream(caplog):
    caplog.set_level(logging.WARNING, logger="cborg.usage")
    u = valid_usage({"prompt_tokens": 10**19, "completion_tokens": -7,
                     "prompt_tokens_details": {"cached_tokens": 10**19}}, "openai (openai/gpt-4o)")
    assert u["prompt_tokens"] == MAX_TOKENS and u["completion_tokens"] == 0
    assert u["prompt_tokens_details"]["cached_tokens"] == MAX_TOKENS
    assert u["total_tokens"] == MAX_TOKENS
    assert all("openai (openai/gpt-4o)" in r.getMessage() for r in caplog.records) and len(caplog.records) >= 2
    ok = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 0}}
    assert valid_usage(dict(ok), "x") == ok


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_absurd_usage_never_stops_the_ledger(tmp_path, fresh_mock, backend, request, caplog):
    caplog.set_level(logging.WARNING)
    db = request.getfixturevalue("pg_url") if backend == "postgres" else None
    with running_gateway(tmp_path, fresh_mock, db=db, edit=_no_user_budget) as gw:
        key = gw.new_key()
        h = {"Authorization": f"Bearer {key}"}
        for u in ABSURD:
            fresh_mock.script.append(Scripted(usage=u))
            r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=h, timeout=30)
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            assert 0 <= usage["prompt_tokens"] <= MAX_TOKENS and 0 <= usage["completion_tokens"] <= MAX_TOKENS
            assert float(r.headers["x-litellm-response-cost"]) >= 0
        for u in ABSURD[:2]:       # streamed, the usage in the last chunk
            fresh_mock.script.append(Scripted(usage=u))
            with httpx.stream("POST", gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=h,
                              timeout=30) as r:
                assert r.status_code == 200
                r.read()
        r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=h, timeout=30)   # an ordinary call
        assert r.status_code == 200
        gw.run(gw.gw.ledger.flush())
        assert gw.gw.ledger.pending() == 0
        rows = gw.run(gw.gw.store.ledger_rows())
        assert len(rows) == len(ABSURD) + 3
        assert all(0 <= x["prompt_tokens"] <= MAX_TOKENS and 0 <= x["completion_tokens"] <= MAX_TOKENS
                   and x["cost"] >= 0 for x in rows)
        spend = gw.run(gw.gw.store.find_key(rows[0]["key_id"])).spend
        assert spend == pytest.approx(sum(x["cost"] for x in rows)) and spend >= 0
    warned = [r.getMessage() for r in caplog.records if r.name == "cborg.usage"]
    assert warned and all("openai (openai/gpt-4o)" in m for m in warned)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_row_the_database_refuses_is_quarantined(tmp_path, fresh_mock, backend, request, caplog):
    """A row that reaches the writer out of range (usage checks bypassed) is logged whole and counted;
    the rows around it are written and the next flush is not held back."""
    caplog.set_level(logging.ERROR, logger="cborg.ledger")
    db = request.getfixturevalue("pg_url") if backend == "postgres" else None
    with running_gateway(tmp_path, fresh_mock, db=db) as gw:
        key = gw.new_key()
        h = {"Authorization": f"Bearer {key}"}
        for _ in range(3):
            assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=h, timeout=30).status_code == 200
        led = gw.gw.ledger

        async def poison():
            await led.flush()             # (a loaded machine may have flushed them already)
            stored = (await gw.gw.store.ledger_rows())[0]
            good = tuple(stored[c] for c in LEDGER_COLUMNS)
            led.add(("bad-1", *good[1:7], 10**19, *good[8:]), (None, None))
            led.add(("good-4", *good[1:]), (None, None))        # in the same flush as the bad ones
            led.add(("bad-2", *good[1:9], -10**20, *good[10:]), (None, None))
            await led.flush()
        gw.run(poison())
        assert led.pending() == 0 and led.quarantined == 2
        rows = gw.run(gw.gw.store.ledger_rows())
        assert sorted(r["request_id"] for r in rows if r["request_id"].startswith("bad")) == []
        assert len(rows) == 4 and "good-4" in [r["request_id"] for r in rows]
        assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=h, timeout=30).status_code == 200
        gw.run(led.flush())
        assert len(gw.run(gw.gw.store.ledger_rows())) == 5
        m = httpx.get(gw.url + "/metrics", timeout=10).text
        assert "cborg_ledger_quarantined_rows_total 2.0" in m
    logged = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(logged) == 2 and '"request_id": "bad-1"' in logged[0] and "10000000000000000000" in logged[0]
