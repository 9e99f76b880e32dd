"""The transport through the whole gateway, with the openai SDK: answers of any size, every legal
framing of a stream (chunked; HTTP/1.0 delimited by the close), the body cap. Real upstream servers
on loopback."""
from __future__ import annotations

import socketserver
import threading
import time

import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import provider_env, running_gateway
from tests.helpers.servers import AiohttpServer

CHAT = {"messages": [{"role": "user", "content": "Write a very long answer."}]}


def _completion(text: str) -> bytes:
    return orjson.dumps({"id": "chatcmpl-big", "object": "chat.completion", "created": 1700000000,
                         "model": "gpt-4o-2024-08-06", "choices": [{"index": 0, "message": {
                             "role": "assistant", "content": text}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}})


@pytest.fixture(scope="module")
def big_upstream():
    """An OpenAI-shaped upstream whose answer's content is as many MiB as the request's `user` field
    says, sent with Content-Length or (user ending in 'c') chunk by chunk."""
    async def chat(req):
        body = await req.json()
        spec = body.get("user") or "1"
        mib = int(spec.rstrip("c"))
        data = _completion("x" * (mib << 20))
        if not spec.endswith("c"):
            return web.Response(body=data, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(req)
        for i in range(0, len(data), 1 << 16):
            await resp.write(data[i:i + (1 << 16)])
        await resp.write_eof()
        return resp
    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    with AiohttpServer(app) as srv:
        yield srv


def _env(mock, url: str) -> dict:
    return {**provider_env(mock), "OPENAI_BASE_URL": url + "/v1"}


def test_large_non_streamed_answers_arrive(tmp_path, mock_openai, big_upstream):
    """1, 4 and 50 MiB answers (the old client stalled past 1 MiB until its read timeout)."""
    with running_gateway(tmp_path, mock_openai, env=_env(mock_openai, big_upstream.url)) as gw:
        client = openai.OpenAI(api_key=gw.new_key(), base_url=gw.url + "/v1", max_retries=0, timeout=120)
        for spec in ("1", "4", "4c", "50"):
            t0 = time.monotonic()
            r = client.chat.completions.create(model="openai/gpt-4o", user=spec, **CHAT)
            assert len(r.choices[0].message.content) == int(spec.rstrip("c")) << 20, spec
            assert time.monotonic() - t0 < 60


def test_answer_over_the_cap_is_a_clear_502(tmp_path, mock_openai, big_upstream):
    with running_gateway(tmp_path, mock_openai, env=_env(mock_openai, big_upstream.url),
                         upstream_max_body_bytes=2 << 20) as gw:
        client = openai.OpenAI(api_key=gw.new_key(), base_url=gw.url + "/v1", max_retries=0, timeout=60)
        for spec in ("4", "4c"):
            with pytest.raises(openai.APIStatusError) as e:
                client.chat.completions.create(model="openai/gpt-4o", user=spec, **CHAT)
            assert e.value.status_code == 502
            assert "too large" in e.value.message and "CBORG_UPSTREAM_MAX_BODY_BYTES" in e.value.message
        assert client.chat.completions.create(model="openai/gpt-4o", user="1", **CHAT).choices


def _chunk(i: int, text: str, finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1700000000,
                                     "model": "gpt-4o-2024-08-06", "choices": [{"index": 0, "delta": {"content": text},
                                                                                 "finish_reason": finish}]}) + b"\n\n"


@pytest.fixture(scope="module")
def http10_sse():
    """A bare HTTP/1.0 server: an SSE stream without Content-Length or chunking, ended by closing."""
    class H(socketserver.StreamRequestHandler):
        def handle(self):
            n = 0
            while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":")[1])
            self.rfile.read(n)
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
            for i in range(20):
                self.wfile.write(_chunk(i, f"w{i} "))
                self.wfile.flush()
                time.sleep(0.005)
            self.wfile.write(_chunk(20, "", "stop"))
            self.wfile.write(b'data: {"id":"chatcmpl-s","object":"chat.completion.chunk","created":1700000000,'
                             b'"model":"gpt-4o-2024-08-06","choices":[],"usage":{"prompt_tokens":7,'
                             b'"completion_tokens":21,"total_tokens":28}}\n\ndata: [DONE]\n\n')
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_http10_close_delimited_stream_ends_normally(tmp_path, mock_openai, http10_sse):
    with running_gateway(tmp_path, mock_openai, env=_env(mock_openai, http10_sse)) as gw:
        client = openai.OpenAI(api_key=gw.new_key(), base_url=gw.url + "/v1", max_retries=0, timeout=30)
        for _ in range(2):
            s = client.chat.completions.create(model="openai/gpt-4o", stream=True, **CHAT)
            chunks = list(s)                                   # the SDK stops at [DONE]: no error event
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "".join(f"w{i} " for i in range(20))
        time.sleep(1.0)                                        # a ledger flush
        rows = gw.run(gw.gw.store.ledger_rows())
    assert [x["status"] for x in rows] == [200, 200], rows
    assert all(x["completion_tokens"] == 21 for x in rows)


def test_chunked_stream_from_aiohttp_upstream(tmp_path, mock_openai):
    """The provider mocks stream with chunked encoding; the whole stream arrives."""
    with running_gateway(tmp_path, mock_openai) as gw:
        client = openai.OpenAI(api_key=gw.new_key(), base_url=gw.url + "/v1", max_retries=0, timeout=30)
        s = client.chat.completions.create(model="openai/gpt-4o", stream=True, **CHAT)
        assert "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        time.sleep(1.0)
        assert [x["status"] for x in gw.run(gw.gw.store.ledger_rows())] == [200]
