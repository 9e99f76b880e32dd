"""The transformers engine: OpenAI chat and completions for one causal LM (CPU, or one GPU without vLLM).

One request generates at a time (a single worker thread: a CPU has no spare capacity for two,
and interleaving would only slow both); the others wait in a bounded queue, and when it is
full the engine answers 503 with retry-after. A request's choices (`n`, or a list of prompts on
/completions) are generated one after another. A client that goes away, streaming or not, stops
its generation at the next token, so that it does not hold the worker for its max_tokens. Stop
strings are matched on the decoded text and cut from it; text that could still become a stop
string is held back from the stream until it is known not to. Usage counts the tokenizer's
tokens: the prompt as the chat template renders it, and every generated token (an end-of-turn
token included, as vLLM counts it).

What a request may ask and how it is read: params.py (every parameter honoured or refused).
`response_format` and a forced `tool_choice` are followed by grammar-constrained decoding
(grammar.py); tool calls come out in OpenAI's shapes, streamed as deltas (tool_calls.py); as vLLM
does, `required` ends with finish_reason "tool_calls" and a named function with "stop".

    python -m inference.engines.transformers_server --spec FILE    (the node starts it)
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, AsyncIterator, Callable

import orjson

from common.asgi import CancelOnDisconnect, HTTPError, Request, StreamResponse, json_response

from . import logprobs
from .causal_lm import CausalLM, Sampling, Step
from .grammar import GrammarError
from .params import MAX_N, Plan, plan
from .server import KeyCheck, Spec, base_app, new_id, now, serve
from .tool_calls import ToolCalls
from .tool_parsers import PARSERS

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


class Choice:
    """One choice's generation, driven in the worker thread: its text, finish reason, token count
    and (when asked) log probabilities. `emit(kind, index, text, steps)` is called as it goes:
    ("start"), ("text": a piece of text released, with the steps that made it), ("end")."""

    def __init__(self, index: int, ids: list[int], sampling: Sampling, stops: list[str], grammar: str | None):
        self.index = index
        self.ids = ids
        self.sampling = sampling
        self.stops = stops
        self.grammar = grammar
        self.text = ""
        self.finish = "length"
        self.completion_tokens = 0
        self.steps: list[Step] = []          # with log probabilities only

    def run(self, lm: CausalLM, cancel: threading.Event, emit: Emit | None) -> None:
        out: list[int] = []
        sent = 0
        held: list[Step] = []                # steps whose text is not released yet
        want_lp = self.sampling.logprobs is not None
        longest = max((len(s) for s in self.stops), default=0)
        constraint = lm.grammars.matcher(self.grammar) if self.grammar else None
        if emit is not None:
            emit("start", self.index, "", [])
        for step in lm.tokens(self.ids, self.sampling, cancel, constraint):
            tok = step.token
            out.append(tok)
            if want_lp:
                self.steps.append(step)
                held.append(step)
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
            if emit is not None and ready > sent:
                emit("text", self.index, text[sent:ready], held)
                held = []
                sent = ready
        else:
            if constraint is not None and constraint.done:
                self.finish = "stop"
        self.completion_tokens = len(out)
        if emit is not None:
            if len(self.text) > sent or held:
                emit("text", self.index, self.text[sent:], held)
            emit("end", self.index, self.finish, [])


Emit = Callable[[str, int, str, list], None]


class Job:
    """A request's choices, generated one after another in the worker thread."""

    def __init__(self, choices: list[Choice], emit: Emit | None):
        self.choices = choices
        self.emit = emit
        self.cancel = threading.Event()

    def __call__(self, lm: CausalLM) -> "Job":
        for c in self.choices:
            if self.cancel.is_set():
                break
            c.run(lm, self.cancel, self.emit)
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
        self.lm.grammars    # llguidance's index of the vocabulary: built now, in a thread, not on first use
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self.admitted = 0
        self.stats: dict[str, Any] = {"deployment": dep.name, "requests": 0, "running": 0, "queued": 0,
                                      "max_model_len": self.lm.max_model_len}

    # -- request parsing ---------------------------------------------------------------
    def budget(self, p: Plan, prompt_len: int, what: str) -> int:
        """The completion's token budget, or the OpenAI-shaped context-length 400."""
        mt, limit = p.max_tokens, self.lm.max_model_len
        if prompt_len + (mt or 1) > limit:
            raise HTTPError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                 f"{prompt_len + (mt or 1)} tokens ({prompt_len} in the {what}, {mt or 1} in the "
                                 "completion). Please reduce the length of the input or completion.",
                            param=what, code="context_length_exceeded")
        return mt if mt is not None else min(self.conf.default_max_tokens, limit - prompt_len)

    def chat_ids(self, body: dict, tools: list[dict] | None = None) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise HTTPError(400, "'messages' must be a non-empty list.", param="messages")
        for i, m in enumerate(msgs):
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, list):
                for part in c:
                    if not isinstance(part, dict) or part.get("type") != "text":
                        raise HTTPError(400, f"messages[{i}]: the model '{self.name}' takes text only.",
                                        param=f"messages[{i}].content")
        # An assistant turn that only called tools has no content: templates that know nothing of tools
        # (most small models') concatenate it, so it is rendered as empty text.
        msgs = [{**m, "content": ""} if isinstance(m, dict) and m.get("content") is None else m for m in msgs]
        try:
            return self.lm.chat_ids(msgs, tools or None)
        except HTTPError:
            raise
        except Exception as e:  # noqa: BLE001 - template errors are the caller's
            raise HTTPError(400, f"The messages cannot be rendered with the chat template: {e}",
                            param="messages") from None

    def prompts(self, body: dict) -> list[list[int]]:
        """/completions' prompt: a string, a token array, or a list of either (one choice each)."""
        p = body.get("prompt")
        if isinstance(p, str) or (isinstance(p, list) and p and all(_is_id(x) for x in p)):
            p = [p]
        if not isinstance(p, list) or not p or len(p) > MAX_N:
            raise HTTPError(400, f"'prompt' must be a string, a token array, or a list of 1 to {MAX_N} of either.",
                            param="prompt")
        out = []
        for i, x in enumerate(p):
            if isinstance(x, str):
                out.append(self.lm.prompt_ids(x))
            elif isinstance(x, list) and x and all(_is_id(t) and t < self.lm.vocab_size for t in x):
                out.append(list(x))
            else:
                raise HTTPError(400, f"prompt[{i}] must be a string or a non-empty list of token ids (0 to "
                                     f"{self.lm.vocab_size - 1}).", param="prompt")
        return out

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
        p = plan(body, op, self.lm.vocab_size, self.conf.generation_config.model_dump(), self.conf.tool_call_parser)
        prompts = [self.chat_ids(body, p.tools)] if op == "chat" else self.prompts(body)
        what = "messages" if op == "chat" else "prompt"
        choices = []
        for ids in prompts:
            mt = self.budget(p, len(ids), what)
            for j in range(p.n):
                s = replace(p.sampling, max_tokens=mt,
                            seed=None if p.sampling.seed is None else (p.sampling.seed + j) % 2 ** 63)
                choices.append(Choice(len(choices), ids, s, p.stops, p.grammar))
        reply = Reply(op, self.name, p, [len(ids) for ids in prompts], self.lm)
        stream = body.get("stream") is True
        so = body.get("stream_options")
        include_usage = isinstance(so, dict) and so.get("include_usage") is True
        self.admit()
        self.stats["requests"] += 1
        loop = asyncio.get_running_loop()
        if not stream:
            job = Job(choices, None)
            fut = loop.run_in_executor(self.worker, job, self.lm)
            fut.add_done_callback(lambda f: self.release())   # when the worker is really free
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:   # the client went away (CancelOnDisconnect): stop generating
                job.cancel.set()
                raise
            except GrammarError as e:
                log.exception("constrained generation failed")
                raise HTTPError(500, f"Constrained generation failed: {e}", code="engine_error") from None
            return json_response(reply.whole(choices))
        q: asyncio.Queue = asyncio.Queue()
        job = Job(choices, lambda *ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        fut = loop.run_in_executor(self.worker, job, self.lm)
        fut.add_done_callback(lambda f: q.put_nowait(None))

        async def closed() -> None:   # however the stream ended, even before it began
            job.cancel.set()          # the client may be gone: stop generating
            fut.add_done_callback(lambda f: self.release())

        return StreamResponse(reply.stream(choices, fut, q, include_usage), on_close=closed)


def _is_id(x: Any) -> bool:
    return type(x) is int and x >= 0


class Reply:
    """The OpenAI shapes of one request's answer: whole, or as stream events."""

    def __init__(self, op: str, model: str, p: Plan, prompt_lens: list[int], lm: CausalLM):
        self.chat = op == "chat"
        self.p = p
        self.prompt_tokens = sum(prompt_lens)
        self.lm = lm
        self.base = {"id": new_id("chatcmpl" if self.chat else "cmpl"),
                     "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": now(), "model": model}

    def _tools(self):
        """The reader of one choice's tool calls: forced (ToolCalls), the model's own (a tool parser), or None."""
        p = self.p
        if p.tool_parser:
            return PARSERS[p.tool_parser]()
        return ToolCalls(p.tool) if p.tool else ToolCalls() if p.tool_list else None

    def _finish(self, finish: str, tc) -> str:
        called = self.p.tool_list or (self.p.tool_parser is not None and bool(tc.calls))
        return "tool_calls" if called and finish == "stop" else finish

    def _usage(self, choices: list[Choice]) -> dict:
        return _usage(self.prompt_tokens, sum(c.completion_tokens for c in choices))

    def whole(self, choices: list[Choice]) -> dict:
        out = []
        for c in choices:
            lp = None
            if self.p.sampling.logprobs is not None:
                lp = logprobs.chat(self.lm, c.steps) if self.chat else logprobs.completion(self.lm, c.steps, self.p)
            if not self.chat:
                out.append({"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish})
                continue
            msg: dict = {"role": "assistant", "content": c.text}
            tc = self._tools()
            if isinstance(tc, ToolCalls):
                tc.feed(c.text)
                msg = {"role": "assistant", "content": None, "tool_calls": tc.calls}
            elif tc is not None:
                tc.feed(c.text)
                tc.end()
                msg = {"role": "assistant", "content": tc.content if tc.content.strip() or not tc.calls else None}
                if tc.calls:
                    msg["tool_calls"] = tc.calls
            out.append({"index": c.index, "message": msg, "logprobs": lp,
                        "finish_reason": self._finish(c.finish, tc)})
        return {**self.base, "object": "chat.completion" if self.chat else "text_completion", "choices": out,
                "usage": self._usage(choices)}

    async def stream(self, choices: list[Choice], fut, q: asyncio.Queue, include_usage: bool) -> AsyncIterator[bytes]:
        base, chat, want_lp = self.base, self.chat, self.p.sampling.logprobs is not None
        tools: dict[int, ToolCalls | None] = {}
        offsets: dict[int, int] = {}
        unsent: dict[int, list] = {}             # steps of text a tool parser holds back: their logprobs wait

        def event(choice: dict) -> bytes:
            return _event({**base, "choices": [choice]})

        def held_lp(i: int) -> dict | None:
            s = unsent.pop(i, None)
            return logprobs.chat(self.lm, s) if s else None

        while True:
            ev = await q.get()
            if ev is None:
                break
            kind, i, text, steps = ev
            if kind == "start":
                tools[i] = self._tools()
                offsets[i] = 0
                if chat:
                    yield event({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None})
            elif kind == "end":
                tc = tools.get(i)
                if tc is not None and not isinstance(tc, ToolCalls):
                    for d in tc.end() or ([{}] if unsent.get(i) else []):   # what the tool parser held back
                        yield event({"index": i, "delta": d, "logprobs": held_lp(i), "finish_reason": None})
                fin = self._finish(text, tc)
                yield event({"index": i, "delta": {}, "logprobs": None, "finish_reason": fin} if chat else
                            {"index": i, "text": "", "logprobs": None, "finish_reason": fin})
            elif not chat:
                lp = logprobs.completion(self.lm, steps, self.p, offsets[i]) if want_lp else None
                offsets[i] += len(text)
                yield event({"index": i, "text": text, "logprobs": lp, "finish_reason": None})
            else:
                tc = tools[i]
                if tc is not None and not isinstance(tc, ToolCalls):     # tool_choice auto: the model's own calls
                    if want_lp:
                        unsent.setdefault(i, []).extend(steps)
                    for d in tc.feed(text):
                        yield event({"index": i, "delta": d, "logprobs": held_lp(i), "finish_reason": None})
                    continue
                lp = logprobs.chat(self.lm, steps) if want_lp else None
                if tc is None:
                    yield event({"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": None})
                    continue
                deltas = tc.feed(text)
                for k, d in enumerate(deltas):
                    yield event({"index": i, "delta": {"tool_calls": [d]}, "logprobs": lp if k == 0 else None,
                                 "finish_reason": None})
        try:
            fut.result()
        except Exception as e:  # noqa: BLE001
            log.exception("generation failed")
            yield _event({"error": {"message": f"Generation failed: {e}", "type": "api_error",
                                    "param": None, "code": "engine_error"}})
            return
        if include_usage:
            yield _event({**base, "choices": [], "usage": self._usage(choices)})
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
        tools = body.get("tools") if isinstance(body.get("tools"), list) else None
        ids = await asyncio.to_thread(lambda: engine.chat_ids(body, tools) if "messages" in body
                                      else engine.prompts(body)[0])
        return json_response({"count": len(ids), "max_model_len": engine.lm.max_model_len, "tokens": ids})

    app.route("/chat/completions", "POST", chat)
    app.route("/completions", "POST", completions)
    app.route("/models", "GET", models)
    app.route("/tokenize", "POST", tokenize)
    return app


async def _json(req: Request) -> dict:
    return await req.json_object()


def main() -> None:
    spec = Spec.from_args()
    serve(build_app(spec), spec)


if __name__ == "__main__":
    main()
