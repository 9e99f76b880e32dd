"""Admins (and the budget refresh) find a key by its id, secret, hash or alias. An alias may never
stand in for another key: a key created with `key_alias` set to a victim's id once took the victim's
place in /key/block, /key/delete and /key/info, so the victim's key kept working after both."""
from __future__ import annotations

import time

import httpx
import pytest

from router.auth import generate_key, hash_key, key_hint, new_key_id
from router.store import open_store
from router.store.base import KeyRecord
from tests.conftest import MASTER_KEY, running_gateway

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def record(user: str, alias: str | None = None, created_at: float | None = None) -> tuple[str, KeyRecord]:
    secret = generate_key()
    now = created_at or time.time()
    return secret, KeyRecord(id=new_key_id(), key_hash=hash_key(secret), key_hint=key_hint(secret), user_id=user,
                             alias=alias, created_at=now, updated_at=now)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    return request.getfixturevalue("pg_url") if request.param == "postgres" else f"sqlite:///{tmp_path / 's.db'}"


async def test_an_id_or_hash_wins_over_a_newer_alias(store_url):
    s = open_store(store_url)
    await s.init()
    try:
        _, victim = record("victim@lbl.gov", created_at=1000.0)
        await s.create_key(victim)
        # rows written before aliases were checked: newer keys whose aliases are the victim's id and hash
        _, by_id = record("attacker@lbl.gov", alias=victim.id, created_at=2000.0)
        _, by_hash = record("attacker@lbl.gov", alias=victim.key_hash, created_at=3000.0)
        await s.create_key(by_id)
        await s.create_key(by_hash)
        assert (await s.find_key(victim.id)).id == victim.id
        assert (await s.find_key(victim.key_hash)).id == victim.id
        _, named = record("ann@lbl.gov", alias="laptop", created_at=4000.0)
        await s.create_key(named)
        assert (await s.find_key("laptop")).id == named.id           # an alias still finds its key
    finally:
        await s.close()


def test_admin_actions_by_id_reach_that_key(tmp_path, mock_openai):
    with running_gateway(tmp_path, mock_openai) as g:
        admin = {"Authorization": f"Bearer {MASTER_KEY}"}
        victim = httpx.post(g.url + "/key/generate", headers=admin, json={"user_id": "victim@lbl.gov"}).json()
        for alias in (victim["key_id"], "KEY-1234", "sk-mine", hash_key("x"), victim["key"]):
            r = httpx.post(g.url + "/key/generate", headers=admin, json={"user_id": "a@lbl.gov", "key_alias": alias})
            assert r.status_code == 400 and r.json()["error"]["param"] == "key_alias", (alias, r.text)
            assert alias not in r.text or alias == "KEY-1234"       # a secret is not echoed back
        # one written before the check (as an older gateway stored it)
        _, squatter = record("attacker@lbl.gov", alias=victim["key_id"])
        g.run(g.gw.store.create_key(squatter))
        info = httpx.get(g.url + "/key/info", params={"key": victim["key_id"]}, headers=admin).json()
        assert info["info"]["user_id"] == "victim@lbl.gov"
        r = httpx.post(g.url + "/key/block", headers=admin, json={"key": victim["key_id"]})
        assert r.status_code == 200 and r.json()["key"] == victim["key_id"], r.text
        time.sleep(0.3)
        r = httpx.post(g.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {victim['key']}"}, json=CHAT)
        assert r.status_code == 401, r.text
