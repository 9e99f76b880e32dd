"""Stored responses are written after the reply (router/stored_responses.py): a continuation or a GET sent
the moment an answer arrives still finds it, a delete before the write wins, a graceful shutdown writes
everything pending, a replica sharing the database finds it once written, a failed write is retried."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from router.store.base import ResponseRecord
from router.store.sqlite import SQLiteStore
from router.stored_responses import StoredResponses
from tests.conftest import running_gateway
from tests.providers.conftest import fast_retries


def _hold_writes(gw) -> None:
    """No background write while the test looks (the writer picks the interval up on its next turn)."""
    gw.responses.interval = 3600
    time.sleep(0.3)


def test_continue_and_read_before_the_write_then_shutdown_writes(tmp_path, mocks):
    mocks.reset()
    with running_gateway(tmp_path, mocks.openai, edit=fast_retries, env=mocks.env()) as g:
        _hold_writes(g.gw)
        client = openai.OpenAI(api_key=g.new_key(), base_url=g.url, max_retries=0)
        first = client.responses.create(model="anthropic/claude-sonnet", input="My name is Ada.")
        native = client.responses.create(model="openai/gpt-4o", input="remember this")
        assert g.run(g.gw.store.get_response(first.id)) is None          # not written yet
        # the next turn, sent at once from other connections, finds it (pending on this gateway)
        with ThreadPoolExecutor(4) as ex:
            seconds = list(ex.map(lambda i: client.responses.create(
                model="xai/grok", input=f"Name? {i}", previous_response_id=first.id), range(4)))
        sent = mocks.openai.requests[-1]["json"]["messages"]
        assert sent[0]["content"] == "My name is Ada." and all(s.status == "completed" for s in seconds)
        assert client.responses.retrieve(first.id).output_text == first.output_text
        assert len(client.responses.input_items.list(first.id).data) == 1
        # deleted before it was ever written: gone, and never written afterwards
        gone = client.responses.create(model="anthropic/claude-sonnet", input="forget me")
        client.responses.delete(gone.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(gone.id)
        assert g.gw.responses.pending() == 6      # first, native, the four continuations (not the deleted one)
        db = g.db_url
    # the gateway stopped gracefully: everything pending was written before its store closed
    store = SQLiteStore(db)

    async def read():
        await store.init()
        try:
            return [await store.get_response(r) for r in (first.id, native.id, *(s.id for s in seconds), gone.id)]
        finally:
            await store.close()
    recs = asyncio.run(read())
    assert [r is not None for r in recs] == [True] * 6 + [False]
    assert recs[0].content()["response"]["output"][0]["content"][0]["text"] == first.output_text
    assert recs[1].native and recs[1].key_id == recs[0].key_id


def test_a_streamed_response_is_kept_before_its_last_event(tmp_path, mocks):
    mocks.reset()
    with running_gateway(tmp_path, mocks.openai, edit=fast_retries, env=mocks.env()) as g:
        _hold_writes(g.gw)
        client = openai.OpenAI(api_key=g.new_key(), base_url=g.url, max_retries=0)
        with client.responses.create(model="anthropic/claude-sonnet", input="My name is Ada.", stream=True) as s:
            for ev in s:
                if ev.type == "response.completed":   # continued before the stream has even closed
                    nxt = client.responses.create(model="google/gemini-flash", input="Name?",
                                                  previous_response_id=ev.response.id)
        assert nxt.status == "completed" and g.run(g.gw.store.get_response(ev.response.id)) is None
        sent = mocks.gemini.requests[-1]["json"]["contents"]
        assert any("My name is Ada." in p.get("text", "") for c in sent for p in c["parts"])


def test_a_replica_sharing_the_database_finds_it_once_written(tmp_path, mocks):
    mocks.reset()
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    with running_gateway(tmp_path / "a", mocks.openai, edit=fast_retries, env=mocks.env(), db=db) as a, \
            running_gateway(tmp_path / "b", mocks.openai, edit=fast_retries, env=mocks.env(), db=db) as b:
        b.gw.responses.miss_wait = 5.0        # (a loaded test machine may write late; the default is 0.3 s)
        key = a.new_key()
        first = openai.OpenAI(api_key=key, base_url=a.url).responses.create(model="xai/grok", input="My name is Ada.")
        other = openai.OpenAI(api_key=key, base_url=b.url, max_retries=0)
        second = other.responses.create(model="xai/grok", input="Name?", previous_response_id=first.id)
        assert second.status == "completed"
        assert mocks.openai.requests[-1]["json"]["messages"][0]["content"] == "My name is Ada."
        b.gw.responses.miss_wait = 0.0
        with pytest.raises(openai.NotFoundError):     # no such response anywhere: a plain 404
            other.responses.retrieve("resp_" + "0" * 32)


class _FlakyStore(SQLiteStore):
    """SQLite whose writes fail while `failing`, or wait for `gate` (a write in progress)."""

    failing = False
    gate: asyncio.Event | None = None

    async def put_responses(self, recs):
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise OSError("disk full")
        await super().put_responses(recs)


def _rec(rid: str) -> ResponseRecord:
    return ResponseRecord(rid, "key-1", "anthropic/claude-sonnet", False, b'{"response":{"id":"%s"},"input":[]}' % rid.encode())


def test_failed_write_is_retried_and_a_delete_waits_for_a_write_in_progress(tmp_path):
    async def main():
        store = _FlakyStore(f"sqlite:///{tmp_path / 'r.db'}")
        await store.init()
        sr = StoredResponses(store, interval=3600, miss_wait=0)
        await sr.start()
        try:
            store.failing = True
            sr.put(_rec("resp_a"))
            await sr.flush()                                 # fails: kept, still readable
            assert sr.pending() == 1 and (await sr.get("resp_a")).id == "resp_a"
            store.failing = False
            await sr.flush()
            assert sr.pending() == 0 and await store.get_response("resp_a") is not None
            # a delete while the batch holding it is being written: written first, then deleted
            store.gate = asyncio.Event()
            sr.put(_rec("resp_b"))
            writing = asyncio.create_task(sr.flush())
            await asyncio.sleep(0.05)
            assert (await sr.get("resp_b")).id == "resp_b"   # readable while being written
            deleting = asyncio.create_task(sr.delete("resp_b"))
            await asyncio.sleep(0.05)
            store.gate.set()
            await writing
            assert await deleting is True
            assert await sr.get("resp_b") is None and await store.get_response("resp_b") is None
            # a delete while a failing write holds it: not written back by the retry
            store.gate, store.failing = asyncio.Event(), True
            sr.put(_rec("resp_c"))
            writing = asyncio.create_task(sr.flush())
            await asyncio.sleep(0.05)
            deleting = asyncio.create_task(sr.delete("resp_c"))
            await asyncio.sleep(0.05)
            store.gate.set()
            await writing
            assert await deleting is True
            store.gate, store.failing = None, False
            await sr.flush()
            assert await store.get_response("resp_c") is None and sr.pending() == 0
        finally:
            await sr.stop()
            await store.close()
    asyncio.run(main())
