"""The transformers engine's reading of requests (inference/engines/params.py) and its tool-call
reader (tool_calls.py), without a model: every parameter honoured or refused with a 400 naming it."""
from __future__ import annotations

import json

import llguidance
import pytest
from hypothesis import given, settings, strategies as st

from common.asgi import HTTPError
from inference.engines.grammar import json_grammar, tool_calls_grammar
from inference.engines.params import plan
from inference.engines.tool_calls import ToolCalls
from inference.engines.tool_parsers import XLAMParser

VOCAB = 1000
MSGS = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "PST"]}}, "required": ["tz"]}}}


def refused(body: dict, op: str = "chat") -> HTTPError:
    with pytest.raises(HTTPError) as e:
        plan({"messages": MSGS, **body}, op, VOCAB)
    assert e.value.status == 400
    return e.value


@pytest.mark.parametrize("name,value", [
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("audio", {"voice": "x"}), ("modalities", ["audio"]),
    ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {}), ("reasoning_effort", "low"),
    ("echo", True), ("suffix", "x"), ("min_tokens", 3), ("ignore_eos", True), ("stop_token_ids", [1]),
    ("guided_json", {"type": "object"}), ("guided_regex", "a+"), ("structured_outputs", {"json": {}}),
    ("best_of", 3), ("use_beam_search", True), ("skip_special_tokens", False), ("chat_template", "{{x}}")])
def test_unsupported_parameters_are_refused_by_name(name, value):
    assert refused({name: value}).param == name


@pytest.mark.parametrize("name,value", [
    ("modalities", ["text"]), ("echo", False), ("best_of", 1), ("user", "u"), ("metadata", {"a": "b"}),
    ("store", False), ("service_tier", "auto"), ("parallel_tool_calls", True), ("unknown_vendor_field", 1),
    ("stream_options", {"include_usage": True}), ("skip_special_tokens", True)])
def test_harmless_parameters_pass(name, value):
    plan({"messages": MSGS, name: value}, "chat", VOCAB)


@pytest.mark.parametrize("body,param", [
    ({"temperature": 2.5}, "temperature"), ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"n": True}, "n"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": "5"}, "max_completion_tokens"),
    ({"seed": 1.5}, "seed"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"),
    ({"logit_bias": {"1000": 5}}, "logit_bias"), ({"logit_bias": {"x": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
    ({"logprobs": "yes"}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p")])
def test_out_of_range_values_name_the_parameter(body, param):
    assert refused(body).param == param


def test_sampling_parameters_are_kept():
    p = plan({"messages": MSGS, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": -1, "n": 3,
              "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2, "max_tokens": 9,
              "logit_bias": {"7": -100, "8": 3}, "logprobs": True, "top_logprobs": 4, "stop": "END"}, "chat", VOCAB)
    s = p.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.presence_penalty, s.frequency_penalty,
            s.repetition_penalty) == (0.5, 0.9, 40, 0.05, 0.5, -0.5, 1.2)
    assert s.logit_bias == {7: -100.0, 8: 3.0} and s.logprobs == 4 and 0 <= s.seed < 2 ** 63
    assert (p.n, p.max_tokens, p.stops) == (3, 9, ["END"])
    assert plan({"prompt": "x", "logprobs": 0}, "completions", VOCAB).sampling.logprobs == 0
    assert plan({"messages": MSGS, "logprobs": False, "top_logprobs": None}, "chat", VOCAB).sampling.logprobs is None


def test_deployment_sampling_defaults_apply_when_the_request_names_none():
    """models.yaml's transformers.generation_config, as vLLM's generation config: a default only."""
    d = {"temperature": 0.2, "top_p": 0.9, "top_k": None, "min_p": None, "repetition_penalty": 1.1}
    s = plan({"messages": MSGS}, "chat", VOCAB, d).sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty) == (0.2, 0.9, 0, 0.0, 1.1)
    s = plan({"messages": MSGS, "temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0}, "chat", VOCAB, d).sampling
    assert (s.temperature, s.top_p, s.repetition_penalty) == (1.0, 1.0, 1.0)
    assert plan({"messages": MSGS}, "chat", VOCAB).sampling.temperature == 1.0          # OpenAI's default


def test_tool_choice_auto_is_refused_with_the_way_out():
    e = refused({"tools": [WEATHER]})                      # auto is the default when tools are given
    assert e.param == "tool_choice" and "'required'" in e.message
    assert refused({"tools": [WEATHER], "tool_choice": "auto"}).param == "tool_choice"
    assert refused({"tool_choice": "required"}).param == "tool_choice"             # no tools
    assert refused({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}
                   ).param == "tool_choice"
    assert refused({"tools": [{"type": "function"}], "tool_choice": "required"}).param == "tools[0]"
    assert refused({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
                    "tool_choice": "required"}).param == "tools[0]"
    p = plan({"messages": MSGS, "tools": [WEATHER], "tool_choice": "none"}, "chat", VOCAB)
    assert p.grammar is None and p.tool is None and not p.tool_list


def test_schemas_the_grammar_cannot_follow_are_a_400():
    e = refused({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}}}})
    assert e.param == "response_format" and "no-such-format" in e.message
    assert refused({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}).param == "response_format"
    assert refused({"response_format": {"type": "xml"}}).param == "response_format"


def _accepts(grammar: str, text: str) -> bool:
    """Whether llguidance's grammar accepts `text` whole (byte-level tokenizer: no model needed)."""
    tok = llguidance.LLTokenizer("byte")
    m = llguidance.LLMatcher(tok, grammar, log_level=0)
    ok = all(m.consume_token(t) for t in tok.tokenize_str(text))
    return ok and m.is_accepting()


def test_grammars_fix_the_output_shape():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    g = json_grammar(schema)
    assert _accepts(g, '{"n": 3}') and not _accepts(g, '{"n": "3"}') and not _accepts(g, '{ "n":3}')
    # declared properties only, unless the schema allows more (as vLLM reads schemas)
    open_ = {"type": "object", "properties": {"n": {"type": "integer"}}}
    assert not _accepts(json_grammar(open_), '{"n": 3, "m": 4}') and _accepts(json_grammar(open_), "{}")
    assert _accepts(json_grammar({**open_, "additionalProperties": True}), '{"n": 3, "m": 4}')
    assert _accepts(json_grammar({"type": "object"}), '{"m": [1, {"k": null}]}')      # json_object: any object
    tools = [("weather", WEATHER["function"]["parameters"]), ("clock", CLOCK["function"]["parameters"])]
    many = tool_calls_grammar(tools, parallel=True)
    text = '[{"name": "clock", "parameters": {"tz": "UTC"}}, {"name": "weather", "parameters": {"city": "Oslo"}}]'
    assert _accepts(many, text)
    assert not _accepts(many, '[{"name": "clock", "parameters": {"tz": "CET"}}]')
    one = tool_calls_grammar(tools, parallel=False)
    assert not _accepts(one, text) and _accepts(one, text.split(", {")[0] + "]")


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1)
                     | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                     max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(obj=st.dictionaries(st.text(max_size=6), _JSON, max_size=4), ascii_only=st.booleans(),
       indent=st.sampled_from([None, 0, 2, 4, "\t"]))
def test_json_mode_takes_any_object_and_ends(obj, ascii_only, indent):
    """json_object: every JSON object is accepted, compact or pretty-printed (SmolLM2 writes JSON as it
    was shown it: forced compact, it wanders); but whitespace and numbers cannot go on forever."""
    g = plan({"messages": MSGS, "response_format": {"type": "json_object"}}, "chat", VOCAB).grammar
    assert _accepts(g, json.dumps(obj, ensure_ascii=ascii_only, indent=indent))
    assert _accepts(g, json.dumps(obj, separators=(",", ":")))
    assert not _accepts(g, '{"age": 36.' + "0" * 16 + "1" * 200 + "}")
    assert not _accepts(g, "{" + " " * 25 + "}") and not _accepts(g, "[1]") and not _accepts(g, ' {"a": 1}')


@settings(max_examples=200, deadline=None)
@given(calls=st.lists(st.tuples(st.sampled_from(["weather", "clock", "a\"b"]),
                                st.dictionaries(st.text(max_size=5), st.recursive(
                                    st.none() | st.integers() | st.text(max_size=8),
                                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c,
                                                                                        max_size=3),
                                    max_leaves=6), max_size=4)), min_size=1, max_size=3),
       cuts=st.lists(st.integers(min_value=1, max_value=12), max_size=40))
def test_tool_calls_read_in_any_pieces_equal_the_whole(calls, cuts):
    """However the generated text is split into stream pieces, the deltas add up to the calls."""
    text = "[" + ", ".join('{"name": ' + json.dumps(n) + ', "parameters": ' + json.dumps(a) + "}"
                           for n, a in calls) + "]"
    whole = ToolCalls()
    whole.feed(text)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole.calls] == \
        [(n, a) for n, a in calls]
    r, pieces, i = ToolCalls(), [], 0
    for k in cuts + [len(text)]:
        pieces += r.feed(text[i:i + k])
        i += k
    rebuilt: dict[int, dict] = {}
    for d in pieces:
        if "id" in d:
            assert d["index"] == len(rebuilt) and d["type"] == "function" and d["function"]["arguments"] == ""
            rebuilt[d["index"]] = {"name": d["function"]["name"], "arguments": ""}
        else:
            rebuilt[d["index"]]["arguments"] += d["function"]["arguments"]
    assert [(c["name"], c["arguments"]) for c in rebuilt.values()] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in whole.calls]


def test_named_tool_streams_its_head_first():
    r = ToolCalls("weather")
    first = r.feed('{"city": ')
    assert first[0]["function"] == {"name": "weather", "arguments": ""} and first[0]["id"].startswith("chatcmpl-tool-")
    assert first[1] == {"index": 0, "function": {"arguments": '{"city": '}}
    r.feed('"Oslo"}')
    assert r.calls[0]["function"]["arguments"] == '{"city": "Oslo"}'


# -- tool_choice "auto": the model's own calls, read by the deployment's parser ---------------------
def test_tool_choice_auto_takes_the_deployments_parser():
    p = plan({"messages": MSGS, "tools": [WEATHER]}, "chat", VOCAB, tool_parser="xlam")
    assert p.tool_parser == "xlam" and p.grammar is None and p.tools == [WEATHER]
    assert plan({"messages": MSGS, "tools": [WEATHER], "tool_choice": "auto"}, "chat", VOCAB,
                tool_parser="xlam").tool_parser == "xlam"
    p = plan({"messages": MSGS, "tools": [WEATHER], "tool_choice": "required"}, "chat", VOCAB, tool_parser="xlam")
    assert p.tool_list and p.tool_parser is None                     # forced choices stay constrained


def _parse(pieces: list[str]) -> tuple[XLAMParser, list[dict]]:
    r = XLAMParser()
    deltas = [d for piece in pieces for d in r.feed(piece)] + r.end()
    return r, deltas


def _cut(text: str, cuts: list[int]) -> list[str]:
    pieces, i = [], 0
    for c in cuts:
        pieces.append(text[i:i + c])
        i += c
    return [*pieces, text[i:]]


def test_xlam_reads_smollm2s_calls():
    r, deltas = _parse(['Sure. <tool_call>[{"name": "weather", "arguments": {"city": "Oslo"}}, '
                        '{"name": "clock", "arguments": {}}]</tool_call>'])
    assert r.content == "Sure. " and deltas[0] == {"content": "Sure. "}
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in r.calls] == \
        [("weather", {"city": "Oslo"}), ("clock", {})]
    d = deltas[1]["tool_calls"][0]
    assert d["index"] == 0 and d["type"] == "function" and d["id"].startswith("chatcmpl-tool-")
    r, _ = _parse(['<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}'])   # one object, never closed
    assert r.calls[0]["function"]["name"] == "weather" and r.content == ""
    r, _ = _parse(["<tool_call>[]</tool_call>"])                                        # the model calls none
    assert not r.calls and r.content == ""
    r, _ = _parse(["I use <tool_call> tags <tool_call>[{oops</tool_call> and <tool_c"])  # not calls: text
    assert not r.calls and r.content == "I use <tool_call> tags <tool_call>[{oops</tool_call> and <tool_c"


_WORDS = st.sampled_from(["<tool_call>", "</tool_call>", "<tool", "_call>", "[", "]", "{", "}", '"name": ',
                          '"weather"', '"arguments": ', '{"city": "Oslo"}', ", ", "hi ", "\n", "<", "é"])


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=60), st.lists(_WORDS, max_size=30).map("".join)),
       cuts=st.lists(st.integers(min_value=1, max_value=9), max_size=30))
def test_xlam_never_raises_and_never_loses_text(text, cuts):
    """Arbitrary output, in arbitrary pieces: the parser never raises; what is not a call is content,
    in order; the stream's deltas add up to the whole answer's."""
    r, deltas = _parse(_cut(text, cuts))
    whole, _ = _parse([text])
    assert "".join(d.get("content", "") for d in deltas) == r.content == whole.content
    assert [c["function"] for c in r.calls] == [c["function"] for c in whole.calls]
    if "<tool_call>" not in text:
        assert r.content == text and not r.calls


_PLAIN = st.text(max_size=30).filter(lambda t: "<tool_call>" not in t)


@settings(max_examples=200, deadline=None)
@given(before=_PLAIN, after=_PLAIN, calls=st.lists(st.tuples(st.sampled_from(["weather", "clock", "a\"b"]),
                                                           st.dictionaries(st.text(max_size=4), st.integers())),
                                                 max_size=3),
       cuts=st.lists(st.integers(min_value=1, max_value=9), max_size=30))
def test_xlam_text_around_a_block_is_content(before, after, calls, cuts):
    block = "<tool_call>" + json.dumps([{"name": n, "arguments": a} for n, a in calls]) + "</tool_call>"
    r, _ = _parse(_cut(before + block + after, cuts))
    assert r.content == before + after
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in r.calls] == calls
