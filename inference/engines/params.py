"""What an OpenAI chat or completions request asks of the transformers engine, read and checked.

Every parameter that changes the answer is honoured or refused with a 400 naming it; none is
silently ignored (the README's table of engine support). Fields that do not change the answer
(`user`, `metadata`, `store`, ...) and fields no API defines are let through, as vLLM does.
Pure: no model, no tokenizer; the engine resolves prompts and the token budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field as dc_field
from typing import Any

from common.asgi import HTTPError

from .causal_lm import Sampling
from .grammar import JSON_OBJECT, GrammarError, check, json_grammar, tool_calls_grammar

MAX_N = 16                 # choices per request (they are generated one after another on a CPU)
MAX_LOGPROBS = 20          # OpenAI's top_logprobs limit, and vLLM's default max_logprobs
MAX_STOPS = 4

# Parameters that change the answer and that this engine does not implement: with a value other
# than the harmless ones, a 400 naming them.
_REFUSED: dict[str, tuple[tuple, str]] = {
    "functions": ((None, []), "the deprecated 'functions' are not supported: send 'tools'"),
    "function_call": ((None, "none"), "the deprecated 'function_call' is not supported: send 'tool_choice'"),
    "audio": ((None,), "this engine produces text only"),
    "modalities": ((None, ["text"]), "this engine produces text only"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "reasoning_effort": ((None,), "this model does not reason"),
    "verbosity": ((None,), "this model has no verbosity setting"),
    "echo": ((None, False), "echoing the prompt is not supported"),
    "suffix": ((None, ""), "suffixes are not supported"),
    "min_tokens": ((None, 0), "min_tokens is not supported"),
    "ignore_eos": ((None, False), "ignore_eos is not supported"),
    "stop_token_ids": ((None, []), "stop_token_ids is not supported: use 'stop'"),
    "bad_words": ((None, []), "bad_words is not supported: use 'logit_bias'"),
    "allowed_token_ids": ((None,), "allowed_token_ids is not supported: use 'logit_bias'"),
    "prompt_logprobs": ((None,), "prompt_logprobs is not supported"),
    "use_beam_search": ((None, False), "beam search is not supported"),
    "include_stop_str_in_output": ((None, False), "include_stop_str_in_output is not supported"),
    "skip_special_tokens": ((None, True), "special tokens are always skipped"),
    "guided_json": ((None,), "use response_format {'type': 'json_schema', ...}"),
    "guided_regex": ((None,), "regular-expression constraints are not supported"),
    "guided_choice": ((None,), "use response_format with a JSON Schema enum"),
    "guided_grammar": ((None,), "grammar constraints are not supported"),
    "structured_outputs": ((None,), "use response_format {'type': 'json_schema', ...}"),
    "chat_template": ((None,), "the deployment's chat template is used"),
    "chat_template_kwargs": ((None, {}), "chat_template_kwargs is not supported"),
    "continue_final_message": ((None, False), "continue_final_message is not supported"),
}


def bad(msg: str, param: str) -> HTTPError:
    return HTTPError(400, msg, param=param, code="invalid_request_error")


def _num(body: dict, name: str, default, lo: float, hi: float, integer: bool = False, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok = type(v) is int if integer else type(v) in (int, float)
    if not ok or (type(v) is float and not math.isfinite(v)):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}.", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"'{name}' must be {'greater than' if lo_open else 'at least'} {lo:g} and at most {hi:g}; "
                  f"got {v}.", name)
    return v


@dataclass
class Plan:
    """How to answer one request: sampling, stops, choices and the shape of the output."""

    sampling: Sampling
    max_tokens: int | None                 # None: the deployment's default
    stops: list[str]
    n: int
    grammar: str | None = None             # llguidance grammar the output must follow
    tool: str | None = None                # a named tool_choice: the output is that tool's arguments
    tool_list: bool = False                # tool_choice "required": the output is a JSON list of calls
    tools: list[dict] = dc_field(default_factory=list)   # for the chat template
    tool_parser: str | None = None         # tool_choice "auto": the parser reading the model's calls


def plan(body: dict, op: str, vocab_size: int, defaults: dict[str, float] | None = None,
         tool_parser: str | None = None) -> Plan:
    """Read a chat (op "chat") or completions request; a 400 naming the first parameter that
    cannot be honoured. `defaults`: the deployment's sampling for parameters the request leaves
    out (temperature, top_p, top_k, min_p, repetition_penalty), as vLLM's generation config.
    `tool_parser`: the deployment's (tool_parsers.py) for a model trained for tools; without one,
    tool_choice "auto" is a 400."""
    d = {k: v for k, v in (defaults or {}).items() if v is not None}
    for name, (harmless, why) in _REFUSED.items():
        v = body.get(name)
        if v not in harmless:
            raise bad(f"'{name}' is not supported by this engine: {why}.", name)
    n = _num(body, "n", 1, 1, MAX_N, integer=True)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise bad("'best_of' is not supported by this engine (only best_of equal to n).", "best_of")
    mt = body.get("max_completion_tokens")
    name = "max_completion_tokens"
    if mt is None:
        mt, name = body.get("max_tokens"), "max_tokens"
    if mt is not None and (type(mt) is not int or mt < 1):
        raise bad(f"'{name}' must be a positive integer.", name)
    s = Sampling(
        max_tokens=0,
        temperature=float(_num(body, "temperature", d.get("temperature", 1.0), 0, 2)),
        top_p=float(_num(body, "top_p", d.get("top_p", 1.0), 0, 1, lo_open=True)),
        top_k=_num(body, "top_k", d.get("top_k", 0), -1, vocab_size, integer=True),
        min_p=float(_num(body, "min_p", d.get("min_p", 0.0), 0, 1)),
        seed=_num(body, "seed", None, -(2 ** 63), 2 ** 64 - 1, integer=True),
        presence_penalty=float(_num(body, "presence_penalty", 0.0, -2, 2)),
        frequency_penalty=float(_num(body, "frequency_penalty", 0.0, -2, 2)),
        repetition_penalty=float(_num(body, "repetition_penalty", d.get("repetition_penalty", 1.0), 0, 2,
                                      lo_open=True)),
        logit_bias=_logit_bias(body.get("logit_bias"), vocab_size),
        logprobs=_logprobs(body, op))
    if s.top_k < 0:
        s.top_k = 0
    if s.seed is not None:
        s.seed %= 2 ** 63
    p = Plan(s, mt, _stops(body.get("stop")), n)
    _output(body, op, p, tool_parser)
    return p


def _logit_bias(lb: Any, vocab_size: int) -> dict[int, float] | None:
    if lb is None:
        return None
    if type(lb) is not dict:
        raise bad("'logit_bias' must map token ids to numbers between -100 and 100.", "logit_bias")
    out = {}
    for k, v in lb.items():
        try:
            tid = int(k)
        except ValueError:
            raise bad(f"logit_bias: {k!r} is not a token id.", "logit_bias") from None
        if not 0 <= tid < vocab_size:
            raise bad(f"logit_bias: token id {tid} is out of vocabulary (0 to {vocab_size - 1}).", "logit_bias")
        if type(v) not in (int, float) or not -100 <= v <= 100:
            raise bad(f"logit_bias: the bias of {k} must be a number between -100 and 100.", "logit_bias")
        out[tid] = float(v)
    return out or None


def _logprobs(body: dict, op: str) -> int | None:
    lp = body.get("logprobs")
    if op == "chat":
        if lp not in (None, True, False):
            raise bad("'logprobs' must be a boolean.", "logprobs")
        top = _num(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
        if top is not None and lp is not True:
            raise bad("'top_logprobs' requires 'logprobs': true.", "top_logprobs")
        return (top or 0) if lp else None
    return _num(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)


def _stops(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(x, str) and x for x in stops):
        raise bad(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them.", "stop")
    return stops


def _grammar(g: str, param: str) -> str:
    try:
        check(g)
    except GrammarError as e:
        raise bad(f"'{param}' cannot be followed: {e}", param) from None
    return g


def _output(body: dict, op: str, p: Plan, tool_parser: str | None) -> None:
    """response_format, tools and tool_choice -> the grammar of the output."""
    rf = body.get("response_format")
    if rf is not None:
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind == "json_object":
            p.grammar = JSON_OBJECT
        elif kind == "json_schema":
            js = rf.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise bad("response_format.json_schema.schema must be a JSON Schema object.", "response_format")
            p.grammar = _grammar(json_grammar(schema), "response_format")
        elif kind != "text":
            raise bad("response_format.type must be 'text', 'json_object' or 'json_schema'.", "response_format")
    if op != "chat":
        return
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise bad("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
        return
    if not isinstance(tools, list):
        raise bad("'tools' must be a list.", "tools")
    fns: dict[str, dict] = {}
    for k, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"tools[{k}] must be {{'type': 'function', 'function': {{'name': ...}}}}.", f"tools[{k}]")
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise bad(f"tools[{k}].function.parameters must be a JSON Schema of type 'object'.", f"tools[{k}]")
        fns[fn["name"]] = params or {"type": "object", "properties": {}}
    p.tools = tools
    if (choice is None or choice == "auto") and tool_parser:
        p.tool_parser = tool_parser        # the model's template shows the tools; the parser reads its calls
        return
    if choice is None or choice == "auto":
        raise bad("This model was not trained to call tools, so tool_choice 'auto' (the default when tools are "
                  "given) is not supported here. Set tool_choice to 'required', or to one function "
                  "({'type': 'function', 'function': {'name': ...}}): its arguments are then produced by "
                  "constrained decoding. 'none' answers in text.", "tool_choice")
    if choice == "none":
        return
    if choice == "required":
        parallel = body.get("parallel_tool_calls") is not False
        p.grammar = _grammar(tool_calls_grammar(list(fns.items()), parallel), "tools")
        p.tool_list = True
        return
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise bad("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                  "{'name': ...}}.", "tool_choice")
    if name not in fns:
        raise bad(f"tool_choice names the function {name!r}, which is not among 'tools'.", "tool_choice")
    p.grammar = _grammar(json_grammar(fns[name]), "tools")
    p.tool = name
