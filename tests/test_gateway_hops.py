"""Two gateways whose provider base URLs point at each other (issue 14 item 7): each forwards with
x-cborg-hops one higher, and a request past MAX_HOPS is refused with 508 at once. Before: each
gateway's own loop id (x-cborg-via) differs, so they relayed the request back and forth until a
timeout or a limit stopped them."""
from __future__ import annotations

import asyncio
import time

import httpx

from router.key_admin import create_key
from router.pipeline import MAX_HOPS
from router.store import open_store
from tests.conftest import MASTER_KEY, provider_env, write_catalog
from tests.helpers.servers import free_port, gateway_proc, wait_http
from tests.test_ledger_durability import CHAT


def key_in(db: str, user: str) -> str:
    async def main():
        s = open_store(db)
        await s.init()
        try:
            return (await create_key(s, user))[0]
        finally:
            await s.close()
    return asyncio.run(main())


def test_two_gateways_pointing_at_each_other_answer_508_quickly(tmp_path, mock_openai):
    cfg = write_catalog(tmp_path / "models.yaml", mock_openai.url)
    ports = free_port(), free_port()
    dbs = [f"sqlite:///{tmp_path / f'g{i}.db'}" for i in range(2)]
    keys = [key_in(db, "hop@lbl.gov") for db in dbs]
    procs = []
    try:
        for i in range(2):
            other = 1 - i
            env = {**provider_env(mock_openai), "CBORG_CONFIG": str(cfg), "CBORG_DATABASE_URL": dbs[i],
                   "CBORG_MASTER_KEY": MASTER_KEY, "OPENAI_BASE_URL": f"http://127.0.0.1:{ports[other]}/v1",
                   "OPENAI_API_KEY": keys[other]}
            procs.append(gateway_proc(ports[i], env, tmp_path / f"g{i}.log"))
        for p, port in zip(procs, ports):
            wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc=p.p)
        t = time.time()
        r = httpx.post(f"http://127.0.0.1:{ports[0]}/v1/chat/completions", json=CHAT, timeout=20,
                       headers={"Authorization": f"Bearer {keys[0]}"})
        took = time.time() - t
        print(f"\ntwo gateways pointing at each other: {r.status_code} after {took:.2f} s")
        assert r.status_code == 508 and "gateways" in r.json()["error"]["message"], r.text
        assert took < 3
        # a direct client's own header: past the limit a 508, malformed the client's error (a 400, not a 5xx)
        r = httpx.post(f"http://127.0.0.1:{ports[0]}/v1/chat/completions", json=CHAT, timeout=20,
                       headers={"Authorization": f"Bearer {keys[0]}", "x-cborg-hops": "99999999999999999999"})
        assert r.status_code == 508
        for bad in ("many", "-1", "", "1.5", "\u00b2"):
            r = httpx.post(f"http://127.0.0.1:{ports[0]}/v1/chat/completions", json=CHAT, timeout=20,
                           headers={"Authorization": f"Bearer {keys[0]}", "x-cborg-hops": bad.encode("latin-1")})
            assert r.status_code == 400 and r.json()["error"]["param"] == "x-cborg-hops", (bad, r.text)
        r = httpx.post(f"http://127.0.0.1:{ports[0]}/v1/chat/completions", json={**CHAT, "model": "xai/grok"},
                       timeout=20, headers={"Authorization": f"Bearer {keys[0]}"})
        assert r.status_code == 200, r.text
        assert mock_openai.requests[-1]["headers"].get("x-cborg-hops") == "1"
    finally:
        for p in procs:
            p.stop()
    seen = sum(p.output().count('"status":508') for p in procs)
    assert seen == MAX_HOPS, seen      # a row at each gateway that relayed it; the last refused it before any
