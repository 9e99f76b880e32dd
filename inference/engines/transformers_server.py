"""The transformers engine: OpenAI chat and completions for one causal LM (CPU, or one GPU without vLLM).

One request generates at a time (a single worker thread: a CPU has no spare capacity for two,
and interleaving would only slow both); the others wait in a bounded queue, and when it is
full the engine answers 503 with retry-after. A client that goes away, streaming or not, stops
its generation at the next token, so that it does not hold the worker for its max_tokens. Stop
strings are matched on the decoded text and cut from it; text that could still become a stop
string is held back from the stream until it is known not to. Usage counts the tokenizer's
tokens: the prompt as the chat template renders it, and every generated token (an end-of-turn
token included, as vLLM counts it).

    python -m inference.engines.transformers_server --spec FILE    (the node starts it)
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

import orjson

from common.asgi import CancelOnDisconnect, HTTPError, Request, StreamResponse, json_response

from .causal_lm import CausalLM, Sampling
from .server import KeyCheck, Spec, base_app, field, new_id, now, serve

log = logging.getLogger("cborg.engine")

DONE = b"data: [DONE]\n\n"


def _event(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0}}


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still turn into a stop string (or a split character)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, 1)
    return hold


class Run:
    """One request's generation, driven in the worker thread."""

    def __init__(self, ids: list[int], sampling: Sampling, stops: list[str],
                 on_text: Callable[[str], None] | None):
        self.ids = ids
        self.sampling = sampling
        self.stops = stops
        self.on_text = on_text
        self.cancel = threading.Event()
        self.text = ""
        self.finish = "length"
        self.completion_tokens = 0

    def __call__(self, lm: CausalLM) -> "Run":
        if self.cancel.is_set():
            return self
        out: list[int] = []
        sent = 0
        longest = max((len(s) for s in self.stops), default=0)
        for tok in lm.tokens(self.ids, self.sampling, self.cancel):
            out.append(tok)
            if tok in lm.stop_ids:
                self.finish = "stop"
                break
            text = lm.decode(out)
            cut = -1
            if self.stops:
                start = max(0, sent - longest)
                hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
                cut = min(hits) if hits else -1
            if cut >= 0:
                self.text = text[:max(cut, sent)]
                self.finish = "stop"
                break
            self.text = text
            ready = len(text) - _held_back(text, self.stops)
            if self.on_text is not None and ready > sent:
                self.on_text(text[sent:ready])
                sent = ready
        self.completion_tokens = len(out)
        if self.on_text is not None and len(self.text) > sent:
            self.on_text(self.text[sent:])
        return self


class TransformersEngine:
    def __init__(self, spec: Spec):
        dep = spec.deployment
        conf = dep.transformers
        tpl = dep.template_path()
        self.name = dep.served_name
        self.conf = conf
        self.lm = CausalLM(spec.weights, conf.device, conf.dtype, tpl.read_text() if tpl else None,
                           conf.threads, dep.max_model_len)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self.admitted = 0
        self.stats: dict[str, Any] = {"deployment": dep.name, "requests": 0, "running": 0, "queued": 0,
                                      "max_model_len": self.lm.max_model_len}

    # -- request parsing ---------------------------------------------------------------
    def sampling(self, body: dict, prompt_len: int, what: str) -> tuple[Sampling, list[str]]:
        n = field(body, "n", (int,), 1)
        if n != 1:
            raise HTTPError(400, "This engine returns one choice per request: 'n' must be 1.", param="n")
        mt = field(body, "max_completion_tokens", (int,)) or field(body, "max_tokens", (int,))
        limit = self.lm.max_model_len
        if mt is not None and mt < 1:
            raise HTTPError(400, "'max_tokens' must be at least 1.", param="max_tokens")
        if prompt_len + (mt or 1) > limit:
            raise HTTPError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                 f"{prompt_len + (mt or 1)} tokens ({prompt_len} in the {what}, {mt or 1} in the "
                                 "completion). Please reduce the length of the input or completion.",
                            param=what, code="context_length_exceeded")
        if mt is None:
            mt = min(self.conf.default_max_tokens, limit - prompt_len)
        temp = field(body, "temperature", (int, float), 1.0)
        if not 0 <= temp <= 2:
            raise HTTPError(400, "'temperature' must be between 0 and 2.", param="temperature")
        top_p = field(body, "top_p", (int, float), 1.0)
        if not 0 < top_p <= 1:
            raise HTTPError(400, "'top_p' must be greater than 0 and at most 1.", param="top_p")
        seed = field(body, "seed", (int,))
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise HTTPError(400, "'stop' must be a non-empty string or a list of up to 4 of them.", param="stop")
        return Sampling(mt, float(temp), float(top_p), seed), stops

    def chat_ids(self, body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise HTTPError(400, "'messages' must be a non-empty list.", param="messages")
        if body.get("tools"):
            raise HTTPError(400, f"The model '{self.name}' served by this engine does not take tools.",
                            param="tools")
        for i, m in enumerate(msgs):
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, list):
                for p in c:
                    if not isinstance(p, dict) or p.get("type") != "text":
                        raise HTTPError(400, f"messages[{i}]: the model '{self.name}' takes text only.",
                                        param=f"messages[{i}].content")
        try:
            return self.lm.chat_ids(msgs)
        except HTTPError:
            raise
        except Exception as e:  # noqa: BLE001 - template errors are the caller's
            raise HTTPError(400, f"The messages cannot be rendered with the chat template: {e}",
                            param="messages") from None

    def prompt_ids(self, body: dict) -> list[int]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, list) and p and all(isinstance(x, int) for x in p) or \
                isinstance(p, list) and p and all(isinstance(x, list) for x in p):
            raise HTTPError(400, "Token arrays as prompt are not supported: send the prompt as a string.",
                            param="prompt")
        if not isinstance(p, str):
            raise HTTPError(400, "'prompt' must be a string (or a list of one string).", param="prompt")
        return self.lm.prompt_ids(p)

    # -- running -----------------------------------------------------------------------
    def admit(self) -> None:
        if self.admitted > self.conf.max_queue:
            raise HTTPError(503, f"The engine serving '{self.name}' is busy: {self.admitted - 1} requests are "
                                 f"waiting (its queue holds {self.conf.max_queue}). Try again shortly.",
                            code="engine_busy", type="service_unavailable", headers=[(b"retry-after", b"1")])
        self.admitted += 1
        self._count()

    def release(self) -> None:
        self.admitted -= 1
        self._count()

    def _count(self) -> None:
        self.stats["running"] = min(1, self.admitted)
        self.stats["queued"] = max(0, self.admitted - 1)

    async def complete(self, op: str, body: dict):
        ids = self.chat_ids(body) if op == "chat" else self.prompt_ids(body)
        sampling, stops = self.sampling(body, len(ids), "messages" if op == "chat" else "prompt")
        stream = body.get("stream") is True
        so = body.get("stream_options")
        include_usage = isinstance(so, dict) and so.get("include_usage") is True
        self.admit()
        self.stats["requests"] += 1
        loop = asyncio.get_running_loop()
        rid = new_id("chatcmpl" if op == "chat" else "cmpl")
        if not stream:
            run = Run(ids, sampling, stops, None)
            fut = loop.run_in_executor(self.worker, run, self.lm)
            fut.add_done_callback(lambda f: self.release())   # when the worker is really free
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:   # the client went away (CancelOnDisconnect): stop generating
                run.cancel.set()
                raise
            return json_response(self._body(op, rid, run, len(ids)))
        q: asyncio.Queue = asyncio.Queue()
        run = Run(ids, sampling, stops, lambda t: loop.call_soon_threadsafe(q.put_nowait, t))
        fut = loop.run_in_executor(self.worker, run, self.lm)
        fut.add_done_callback(lambda f: q.put_nowait(None))

        async def closed() -> None:   # however the stream ended, even before it began
            run.cancel.set()          # the client may be gone: stop generating
            fut.add_done_callback(lambda f: self.release())

        return StreamResponse(self._stream(op, rid, run, fut, q, len(ids), include_usage), on_close=closed)

    def _body(self, op: str, rid: str, run: Run, prompt_len: int) -> dict:
        if op == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": run.text}, "logprobs": None,
                      "finish_reason": run.finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": run.text, "logprobs": None, "finish_reason": run.finish}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": now(), "model": self.name, "choices": [choice],
                "usage": _usage(prompt_len, run.completion_tokens)}

    async def _stream(self, op: str, rid: str, run: Run, fut, q: asyncio.Queue, prompt_len: int,
                      include_usage: bool) -> AsyncIterator[bytes]:
        chat = op == "chat"
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": now(),
                "model": self.name}

        def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> bytes:
            if chat:
                d: dict = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
                c = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return _event({**base, "choices": [c]})

        if chat:
            yield chunk(None, role=True)
        while True:
            t = await q.get()
            if t is None:
                break
            yield chunk(t)
        try:
            fut.result()
        except Exception as e:  # noqa: BLE001
            log.exception("generation failed")
            yield _event({"error": {"message": f"Generation failed: {e}", "type": "api_error",
                                    "param": None, "code": "engine_error"}})
            return
        yield chunk(None, run.finish)
        if include_usage:
            yield _event({**base, "choices": [], "usage": _usage(prompt_len, run.completion_tokens)})
        yield DONE


def build_app(spec: Spec):
    engine = TransformersEngine(spec)
    check = KeyCheck(os.environ.get("CBORG_ENGINE_KEY"))
    app = base_app(check, lambda: engine.stats)
    app.state = engine  # type: ignore[attr-defined]

    async def chat(req: Request):
        check(req)
        body = await _json(req)
        with CancelOnDisconnect(req):
            return await engine.complete("chat", body)

    async def completions(req: Request):
        check(req)
        body = await _json(req)
        with CancelOnDisconnect(req):
            return await engine.complete("completions", body)

    async def models(req: Request):
        check(req)
        return json_response({"object": "list", "data": [{"id": engine.name, "object": "model", "created": now(),
                                                          "owned_by": "cborg", "max_model_len": engine.lm.max_model_len}]})

    async def tokenize(req: Request):
        """vLLM's /tokenize shape: the prompt's token count as the chat template renders the messages (the
        gateway's exact count_tokens for local models)."""
        check(req)
        body = await _json(req)
        ids = await asyncio.to_thread(engine.chat_ids if "messages" in body else engine.prompt_ids, body)
        return json_response({"count": len(ids), "max_model_len": engine.lm.max_model_len, "tokens": ids})

    app.route("/chat/completions", "POST", chat)
    app.route("/completions", "POST", completions)
    app.route("/models", "GET", models)
    app.route("/tokenize", "POST", tokenize)
    return app


async def _json(req: Request) -> dict:
    body = await req.json()
    if not isinstance(body, dict):
        raise HTTPError(400, "Request body must be a JSON object.")
    return body


def main() -> None:
    spec = Spec.from_args()
    serve(build_app(spec), spec)


if __name__ == "__main__":
    main()
