"""The mocks themselves: the official SDKs talk to them, and they refuse what the real APIs refuse.

If a mock drifted from the provider's API, the gateway tests against it would prove little; here
the anthropic SDK, Google's google-genai SDK and botocore's own bedrock-runtime client (request
signing, event-stream parsing) are pointed at the mocks.
"""
from __future__ import annotations

import anthropic
import botocore.session
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

PIRATE = "Always talk like a pirate. " * 200
_F = [{"toolSpec": {"name": "f", "inputSchema": {"json": {"type": "object"}}}}]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # the SDK warns of claude-sonnet-4-5's retirement
def test_anthropic_sdk_against_mock(fresh):
    m = fresh.anthropic
    c = anthropic.Anthropic(api_key=m.api_key, base_url=m.url, max_retries=0)
    system = [{"type": "text", "text": PIRATE, "cache_control": {"type": "ephemeral"}}]
    r1 = c.messages.create(model="claude-sonnet-4-5", max_tokens=100, system=system,
                           messages=[{"role": "user", "content": "Hello"}])
    r2 = c.messages.create(model="claude-sonnet-4-5", max_tokens=100, system=system,
                           messages=[{"role": "user", "content": "Hello again"}])
    assert r1.content[0].text == "echo: Hello" and r1.stop_reason == "end_turn"
    assert r1.usage.cache_creation_input_tokens > 1000 and r1.usage.cache_read_input_tokens == 0
    assert r2.usage.cache_read_input_tokens == r1.usage.cache_creation_input_tokens
    tools = [{"name": "get_weather", "description": "w",
              "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}},
             {"name": "get_time", "description": "t", "input_schema": {"type": "object", "properties": {}}}]
    with c.messages.stream(model="claude-haiku-4-5", max_tokens=100, tools=tools,
                           messages=[{"role": "user", "content": "weather?"}]) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[0].type == "tool_use" and final.content[0].input == {"location": "Berkeley, CA", "unit": "c"}
    # a tool without arguments: the SDK assembles the empty partial_json the mock streams into {}
    with c.messages.stream(model="claude-haiku-4-5", max_tokens=100, tools=tools,
                           tool_choice={"type": "tool", "name": "get_time"},
                           messages=[{"role": "user", "content": "time?"}]) as s:
        final = s.get_final_message()
    assert final.content[0].name == "get_time" and final.content[0].input == {}
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(api_key="sk-ant-wrong", base_url=m.url, max_retries=0).messages.create(
            model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "x"}])


def test_google_genai_sdk_against_mock(fresh):
    from google import genai
    from google.genai import types
    m = fresh.gemini
    c = genai.Client(api_key=m.api_key, http_options=types.HttpOptions(base_url=m.url, api_version="v1beta"))
    r = c.models.generate_content(model="gemini-2.5-flash", contents="hello there",
                                  config=types.GenerateContentConfig(system_instruction="Be brief.", temperature=0.2))
    assert r.text == "echo: hello there" and r.usage_metadata.thoughts_token_count == 7
    assert m.requests[-1]["path"] == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert [x.text for x in c.models.generate_content_stream(model="gemini-2.5-flash", contents="a b")] == \
        ["echo:", " a", " b"]
    assert m.requests[-1]["query"] == {"alt": "sse"}
    # the SDK sends parameters_json_schema (snake_case), as the gateway sends parametersJsonSchema
    fn = types.FunctionDeclaration(name="get_weather", description="w", parameters_json_schema={
        "type": "object", "properties": {"location": {"type": "string"}}, "additionalProperties": False})
    r = c.models.generate_content(model="gemini-2.5-pro", contents="weather?",
                                  config=types.GenerateContentConfig(tools=[types.Tool(function_declarations=[fn])]))
    # (arguments valid against the schema, which leaves no room for the mocks' usual "unit")
    assert r.function_calls[0].name == "get_weather" and r.function_calls[0].args == {"location": "mock"}
    assert "parameters_json_schema" in m.requests[-1]["json"]["tools"][0]["functionDeclarations"][0]
    big = "Background. " * 600
    u = [c.models.generate_content(model="gemini-2.5-flash", contents=big).usage_metadata for _ in range(2)]
    assert u[0].cached_content_token_count is None and u[1].cached_content_token_count >= 1024
    wrong = genai.Client(api_key="AIzaWrong", http_options=types.HttpOptions(base_url=m.url, api_version="v1beta"))
    with pytest.raises(genai.errors.ClientError, match="API key not valid"):
        wrong.models.generate_content(model="gemini-2.5-flash", contents="x")


def _bedrock_client(m, secret=None, region=None):
    return botocore.session.get_session().create_client(
        "bedrock-runtime", region_name=region or m.region, endpoint_url=m.url, aws_access_key_id=m.access_key,
        aws_secret_access_key=secret or m.secret_key, config=Config(retries={"max_attempts": 1}))


def test_botocore_client_against_bedrock_mock(fresh):
    m = fresh.bedrock
    c = _bedrock_client(m)
    r = c.converse(modelId="meta.llama3-1-8b-instruct-v1:0", messages=[{"role": "user", "content": [{"text": "hi"}]}],
                   inferenceConfig={"maxTokens": 20})
    assert r["output"]["message"]["content"][0]["text"] == "echo: hi" and r["stopReason"] == "end_turn"
    assert m.requests[-1]["raw_path"] == "/model/meta.llama3-1-8b-instruct-v1%3A0/converse"
    s = c.converse_stream(modelId="cohere.command-r-v1:0", messages=[{"role": "user", "content": [{"text": "a b c"}]}])
    events = list(s["stream"])
    text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
    assert text == "echo: a b c"
    assert events[-1]["metadata"]["usage"]["outputTokens"] > 0
    for bad, code in ((_bedrock_client(m, secret="wrong-secret-key-000000000"), "InvalidSignatureException"),
                      (_bedrock_client(m, region="us-east-1"), "InvalidSignatureException")):
        with pytest.raises(ClientError) as e:
            bad.converse(modelId="cohere.command-r-v1:0", messages=[{"role": "user", "content": [{"text": "x"}]}])
        assert e.value.response["Error"]["Code"] == code
    with pytest.raises(ClientError) as e:
        c.converse_stream(modelId="meta.llama3-1-8b-instruct-v1:0",
                          messages=[{"role": "user", "content": [{"text": "x"}]}],
                          toolConfig={"tools": _F})
    assert "tool use in streaming mode" in str(e.value)


def _post(url, body, headers):
    return httpx.post(url, json=body, headers=headers, timeout=10)


@pytest.mark.parametrize("body,words", [
    ({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
    ({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
     'Unexpected role "system"'),
    ({"model": "claude-sonnet-4-5", "max_tokens": 5, "temperature": 0.5, "top_p": 0.5,
      "messages": [{"role": "user", "content": "x"}]}, "cannot both be specified"),
    ({"model": "claude-sonnet-4-5", "max_tokens": 5, "seed": 1, "messages": [{"role": "user", "content": "x"}]},
     "seed: Extra inputs are not permitted"),
    ({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_x", "content": "r"}]}]}, "unexpected `tool_use_id`"),
    ({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": ""}]}]}, "text content blocks must be non-empty"),
    ({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": " \n"}]}]}, "text content blocks must contain non-whitespace text"),
    ({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": ""}]},
     "all messages must have non-empty content"),
    ({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": []}]},
     "all messages must have non-empty content"),
    ({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "/9j/4AAQ"}}]}]},
     "does not match the provided media type"),
])
def test_anthropic_mock_refuses(fresh, body, words):
    m = fresh.anthropic
    r = _post(m.url + "/v1/messages", body, {"x-api-key": m.api_key, "anthropic-version": "2023-06-01"})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    r = _post(m.url + "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 5,
                                       "messages": [{"role": "user", "content": "x"}]}, {"x-api-key": m.api_key})
    assert r.status_code == 400 and "anthropic-version" in r.text


@pytest.mark.parametrize("body,words", [
    ({"contents": [{"role": "user", "parts": [{"text": "x"}]}], "temperature": 1}, 'Unknown name "temperature"'),
    ({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, "valid role"),
    ({"contents": [{"role": "user", "parts": [{"text": "x"}]}], "tools": [{"functionDeclarations": [
        {"name": "f", "parameters": {"type": "object", "additionalProperties": False}}]}]},
     'Unknown name "additionalProperties"'),
    ({"contents": [{"role": "user", "parts": [{"text": "x"}]},
                   {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
                   {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}},
                                              {"functionResponse": {"name": "f", "response": {}}}]}]},
     "number of function response parts"),
    ({}, "contents is not specified"),
])
def test_gemini_mock_refuses(fresh, body, words):
    m = fresh.gemini
    r = _post(m.url + "/v1beta/models/gemini-2.5-flash:generateContent", body, {"x-goog-api-key": m.api_key})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    r = _post(m.url + "/v1beta/models/gemini-2.5-flash:generateContent", body, {"x-goog-api-key": "AIzaWrong"})
    assert r.status_code == 400 and "API key not valid" in r.text


@pytest.mark.parametrize("kw,words", [
    ({"messages": [{"role": "assistant", "content": [{"text": "x"}]}]}, "must start with a user message"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}, {"role": "user", "content": [{"text": "y"}]}]},
     "must alternate"),
    ({"messages": [{"role": "user", "content": [{"text": " "}]}]}, "is blank"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}, {"cachePoint": {"type": "default"}}]}]},
     "prompt caching"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}], "temperature": 0.3}, "Unknown parameter"),
    ({"messages": [{"role": "user", "content": []}]}, "content field in the Message object at messages.0 is empty"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]},
                   {"role": "assistant", "content": [{"toolUse": {"toolUseId": "t1", "name": "f", "input": {}}}]},
                   {"role": "user", "content": [{"toolResult": {"toolUseId": "t1", "content": [{"text": "r"}]}}]}]},
     "toolConfig field must be defined"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}],
      "toolConfig": {"tools": _F, "toolChoice": {"any": {}}}}, "doesn't support the toolConfig.toolChoice.any field"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}],
      "toolConfig": {"tools": _F, "toolChoice": {"tool": {"name": "f"}}}}, "toolConfig.toolChoice.tool field"),
])
def test_bedrock_mock_refuses(fresh, kw, words):
    c = _bedrock_client(fresh.bedrock)
    with pytest.raises(Exception) as e:
        c.converse(modelId="meta.llama3-1-8b-instruct-v1:0", **kw)
    assert words in str(e.value)


def test_bedrock_mock_tool_choice_by_model(fresh):
    """Cohere's Converse support takes no toolChoice at all; Claude's takes any and tool."""
    c = _bedrock_client(fresh.bedrock)
    msgs = [{"role": "user", "content": [{"text": "x"}]}]
    with pytest.raises(ClientError, match="toolChoice.auto field"):
        c.converse(modelId="cohere.command-r-v1:0", messages=msgs, toolConfig={"tools": _F, "toolChoice": {"auto": {}}})
    for choice in ({"any": {}}, {"tool": {"name": "f"}}):
        r = c.converse(modelId="anthropic.claude-sonnet-4-5-20250929-v1:0", messages=msgs,
                       toolConfig={"tools": _F, "toolChoice": choice})
        assert r["stopReason"] == "tool_use"


_TOOL = {"type": "function", "function": {"name": "f"}}


@pytest.mark.parametrize("body,words", [
    ({"model": "o1-mini", "reasoning_effort": "low"}, "Unknown parameter: 'reasoning_effort'"),
    ({"model": "gpt-4.1", "tools": [{**_TOOL, "cache_control": {"type": "ephemeral"}}]},
     "('cache_control' was unexpected) - 'tools.0'"),
])
def test_openai_mock_refuses(fresh, body, words):
    m, auth = fresh.openai, {"Authorization": f"Bearer {fresh.openai.api_key}"}
    msgs = [{"role": "user", "content": "x"}]
    r = _post(m.url + "/v1/chat/completions", {**body, "messages": msgs}, auth)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    for ok in ({"model": "o3-mini", "reasoning_effort": "low"}, {"model": "gpt-4.1", "tools": [_TOOL]}):
        assert _post(m.url + "/v1/chat/completions", {**ok, "messages": msgs}, auth).status_code == 200
