"""Real client frameworks with their defaults, against a live gateway: LangChain, LlamaIndex,
instructor and the openai SDK's `parse`, each on a commercial model (through the loopback mocks)
and on lbl/* (the CPU profile's own deployments on a real node: whatever model the profile has).

One node and one gateway for the module. The CPU model is tiny, so what is checked on lbl/* is
what constrained decoding guarantees (the shape: JSON valid against the schema, tool arguments
valid against the tool), not the content."""
from __future__ import annotations

import base64
import json
import os

import openai
import pytest
import yaml
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tests.helpers.inference import MASTER_KEY, NODE_TOKEN, GatewayUnderTest, NodeUnderTest, write_config
from tests.helpers.servers import ROOT, ASGIServer, free_port
from tests.providers.conftest import mocks  # noqa: F401 - the provider mocks (session fixture)

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

COMMERCIAL, LOCAL = "anthropic/claude-sonnet", "lbl/llama"
EMBED_COMMERCIAL, EMBED_LOCAL = "openai/text-embedding-3-small", "lbl/nomic-embed-text"
BOTH = [COMMERCIAL, LOCAL]


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)


def get_weather(city: Literal["Oslo", "Paris", "Berkeley"]) -> str:
    """Get the weather in a city."""
    return f"sunny in {city}"


def cpu_deployments() -> list[dict]:
    """The CPU profile's deployments of lbl/llama and the embedding model, on the test node."""
    conf = yaml.safe_load((ROOT / "models.yaml").read_text())
    deps = [d for d in conf["profiles"]["cpu"]["deployments"]
            if d.get("autoload", True) and d["model"] in (LOCAL, EMBED_LOCAL)]
    return [{**d, "node": "t"} for d in deps]


@pytest.fixture(scope="module")
def gw(mocks, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("frameworks")
    port = free_port()
    deps = cpu_deployments()
    cfg = write_config(tmp / "models.yaml", port, deps)
    conf = yaml.safe_load(cfg.read_text())
    conf["models"].append({"name": EMBED_COMMERCIAL, "provider": "openai", "model": "text-embedding-3-small",
                           "mode": "embedding"})
    cfg.write_text(yaml.safe_dump(conf, sort_keys=False))
    node = NodeUnderTest(tmp, cfg, port)
    try:
        for d in deps:
            node.wait(d["name"], "ready")
        from router.app import create_app
        from router.config import Settings
        settings = Settings(config_path=cfg, database_url=f"sqlite:///{tmp / 'gw.db'}", master_key=MASTER_KEY,
                            env=mocks.env(), profile="test", nodes=[{"name": "t", "url": node.url, "token": NODE_TOKEN}],
                            node_poll_s=0.5, request_logs=False)
        with ASGIServer(create_app(settings)) as srv:
            g = GatewayUnderTest(srv)
            for d in deps:
                g.wait_model(d["model"])
            yield g
    finally:
        node.stop()


@pytest.fixture(scope="module")
def key(gw):
    return gw.new_key()


@pytest.fixture(scope="module", autouse=True)
def tiktoken_offline(tmp_path_factory):
    """LangChain's OpenAIEmbeddings tokenizes with tiktoken, which downloads cl100k on first use (no
    network here). The same file, rebuilt from bpe-openai's copy of the encoding, goes where tiktoken
    caches it; tiktoken checks its SHA-256 against the one it expects."""
    import hashlib

    import bpe_openai
    enc = bpe_openai.get_encoding("cl100k_base")
    data = b"".join(base64.b64encode(enc.decode_single_token_bytes(r)) + b" %d\n" % r for r in range(100256))
    d = tmp_path_factory.mktemp("tiktoken")
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    (d / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(d)
    yield
    if old is None:
        os.environ.pop("TIKTOKEN_CACHE_DIR", None)
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = old


def chat_model(gw, key, model, **kw):
    from langchain_openai import ChatOpenAI
    return ChatOpenAI(model=model, base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=300, **kw)


# -- LangChain ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", BOTH)
def test_langchain_invoke_stream_batch(gw, key, model):
    llm = chat_model(gw, key, model)
    r = llm.invoke("Say hello.")
    assert isinstance(r.content, str) and r.usage_metadata["output_tokens"] > 0
    chunks = list(llm.stream("Say hello."))
    assert len(chunks) > 1 and isinstance("".join(c.content for c in chunks), str)
    out = llm.batch(["Say hello.", "Say goodbye."])
    assert len(out) == 2 and all(isinstance(m.content, str) for m in out)


@pytest.mark.parametrize("model", BOTH)
def test_langchain_bind_tools(gw, key, model):
    from langchain_core.messages import ToolMessage
    llm = chat_model(gw, key, model)
    if model == LOCAL:
        # The default (tool_choice auto) goes through the deployment's tool parser: the 135M model, free to
        # choose, mostly answers in words; tool_choice "any" (required) makes it call.
        free = llm.bind_tools([get_weather]).invoke("Weather in Oslo?")
        assert free.content or free.tool_calls
        assert all(c["name"] == "get_weather" for c in free.tool_calls)
        bound = llm.bind_tools([get_weather], tool_choice="any")
    else:
        bound = llm.bind_tools([get_weather])
    msg = bound.invoke("Weather in Oslo?")
    call = msg.tool_calls[0]
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Oslo", "Paris", "Berkeley")
    streamed = None
    for c in bound.stream("Weather in Oslo?"):
        streamed = c if streamed is None else streamed + c
    assert streamed.tool_calls[0]["name"] == "get_weather" and streamed.tool_calls[0]["args"] == {
        "city": streamed.tool_calls[0]["args"]["city"]}
    # the tool's answer goes back and the model answers in text
    follow = llm.invoke(["Weather in Oslo?", msg, ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"])])
    assert isinstance(follow.content, str)


@pytest.mark.parametrize("model", BOTH)
def test_langchain_with_structured_output(gw, key, model):
    p = chat_model(gw, key, model).with_structured_output(Person).invoke("Ada Lovelace was 36.")
    assert isinstance(p, Person)


@pytest.mark.parametrize("model", [EMBED_COMMERCIAL, EMBED_LOCAL])
def test_langchain_embeddings_default_token_arrays(gw, key, mocks, model):  # noqa: F811
    """OpenAIEmbeddings sends cl100k token arrays by default: openai/* gets them as they are, the
    local model gets the text back (the same vectors as the strings give)."""
    from langchain_openai import OpenAIEmbeddings
    emb = OpenAIEmbeddings(model=model, base_url=gw.url + "/v1", api_key=key, max_retries=0)
    texts = ["Cats eat fish.", "Berkeley Lab is in California."]
    docs = emb.embed_documents(texts)
    query = emb.embed_query("What do cats eat?")
    assert len(docs) == 2 and len(docs[0]) == len(query) > 0
    if model == EMBED_COMMERCIAL:
        sent = mocks.openai.requests[-1]["json"]["input"]
        assert type(sent) is list and type(sent[0]) is list and type(sent[0][0]) is int
        return
    direct = openai.OpenAI(api_key=key, base_url=gw.url, max_retries=0).embeddings.create(
        model=model, input=texts, encoding_format="float")
    for got, want in zip(docs, direct.data):
        assert max(abs(a - b) for a, b in zip(got, want.embedding)) < 1e-5


# -- LlamaIndex -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", BOTH)
def test_llamaindex_openai_like(gw, key, model):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike
    llm = OpenAILike(model=model, api_base=gw.url + "/v1", api_key=key, is_chat_model=True, max_retries=0,
                     timeout=300)
    r = llm.chat([ChatMessage(role="user", content="Say hello.")])
    assert isinstance(r.message.content, str)
    pieces = list(llm.stream_complete("Say hello."))
    assert pieces and isinstance(pieces[-1].text, str)
    # Structured prediction through tools: LlamaIndex's documented switch for OpenAI-compatible servers
    # (without it, it sends tool_choice without tools, which OpenAI and vLLM refuse as well).
    tooled = OpenAILike(model=model, api_base=gw.url + "/v1", api_key=key, is_chat_model=True,
                        is_function_calling_model=True, max_retries=0, timeout=300)
    assert isinstance(tooled.structured_predict(Person, _prompt("Ada Lovelace was 36.")), Person)


def _prompt(text: str):
    from llama_index.core.prompts import PromptTemplate
    return PromptTemplate(text)


@pytest.mark.parametrize("model", [EMBED_COMMERCIAL, EMBED_LOCAL])
def test_llamaindex_openai_embedding(gw, key, model):
    from llama_index.embeddings.openai import OpenAIEmbedding
    # model_name: LlamaIndex's way to name a model that is not one of OpenAI's (`model` must be)
    emb = OpenAIEmbedding(model_name=model, api_base=gw.url + "/v1", api_key=key, max_retries=0)
    v = emb.get_text_embedding("Cats eat fish.")
    q = emb.get_query_embedding("What do cats eat?")
    assert len(v) == len(q) > 0


# -- instructor -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", BOTH)
def test_instructor_tools_mode(gw, key, model):
    import instructor
    client = instructor.from_openai(openai.OpenAI(api_key=key, base_url=gw.url, max_retries=0, timeout=300))
    p = client.chat.completions.create(model=model, response_model=Person,
                                       messages=[{"role": "user", "content": "Ada Lovelace was 36."}])
    assert isinstance(p, Person)


class Loose(BaseModel):
    # What any JSON object validates as: a tiny model cannot be asked to follow a schema given in words.
    # (Not a docstring: instructor quotes the schema, description and all, in the prompt.)
    model_config = ConfigDict(extra="allow")


@pytest.mark.parametrize("model", ["openai/gpt-4o", LOCAL])
def test_instructor_json_mode(gw, key, model):
    """JSON mode (json_object, the schema in the prompt). The mock follows the quoted schema as a
    large model would; on lbl/* the grammar guarantees a JSON object, which is what is checked."""
    import instructor
    client = instructor.from_openai(openai.OpenAI(api_key=key, base_url=gw.url, max_retries=0, timeout=300),
                                    mode=instructor.Mode.JSON)
    response_model = Person if model != LOCAL else Loose
    p, raw = client.chat.completions.create_with_completion(
        model=model, response_model=response_model, max_retries=0,
        messages=[{"role": "user", "content": "Ada Lovelace was 36."}])
    assert isinstance(p, response_model)
    assert isinstance(json.loads(raw.choices[0].message.content), dict)


# -- the openai SDK's parse helper ------------------------------------------------------------------
@pytest.mark.parametrize("model", BOTH)
def test_openai_sdk_parse(gw, key, model):
    client = openai.OpenAI(api_key=key, base_url=gw.url, max_retries=0, timeout=300)
    r = client.chat.completions.parse(model=model, response_format=Person,
                                      messages=[{"role": "user", "content": "Ada Lovelace was 36."}])
    assert isinstance(r.choices[0].message.parsed, Person)
    with client.chat.completions.stream(model=model, response_format=Person,
                                        messages=[{"role": "user", "content": "Ada Lovelace was 36."}]) as s:
        final = s.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)

