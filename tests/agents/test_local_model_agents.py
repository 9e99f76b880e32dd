"""Claude Code and Codex on a local model: lbl/llama on the real CPU engine (transformers), through a real
node. The small stand-in model's answers are weak, so the protocol round trip is what is checked: the
agent gets an answer, the engine generated it, the ledger has the call (free), count_tokens is the
engine's own tokenizer count."""
from __future__ import annotations

import anthropic
import pytest

from tests.helpers.agents import run_claude, run_codex
from tests.helpers.inference import node_and_gateway, smollm, smollm_tokenizer

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    deps = [smollm("llama-t", max_model_len=8192, transformers={"default_max_tokens": 8, "max_queue": 4})]
    with node_and_gateway(tmp_path_factory.mktemp("agents-cpu"), deps) as (node, gw):
        yield node, gw


def _rows(gw, endpoint: str) -> list[dict]:
    import asyncio
    import time
    time.sleep(0.7)                   # one ledger flush
    rows = asyncio.run_coroutine_threadsafe(gw.gw.store.ledger_rows(), gw.gw.loop).result(10)
    return [r for r in rows if r["endpoint"] == endpoint]


def test_claude_code_on_a_local_model(local, tmp_path):
    node, gw = local
    # A short system prompt and no tools (the README's advice for small local models): a prompt of a few
    # hundred tokens instead of thousands, which a CPU reads in seconds.
    out = run_claude(gw.url, gw.new_key(), "lbl/llama", "Say hello.", tmp_path, tmp_path / "home",
                     extra_env={"CLAUDE_CODE_MAX_OUTPUT_TOKENS": "8"},
                     args=("--system-prompt", "Be brief.", "--tools", ""))
    # Claude Code ran to its end on answers the engine generated (the stand-in model runs into the small
    # output limit, which Claude Code reports as an error of the answer, not of the protocol).
    assert out["type"] == "result" and out["session_id"], out
    rows = _rows(gw, "messages")
    assert rows and rows[-1]["status"] == 200 and rows[-1]["cost"] == 0 and rows[-1]["prompt_tokens"] > 100
    assert rows[-1]["completion_tokens"] >= 1 and rows[-1]["served_model"] == "meta-llama/Llama-3.3-70B-Instruct"


def test_codex_on_a_local_model(local, tmp_path):
    node, gw = local
    brief = tmp_path / "brief.md"
    brief.write_text("Be brief.")
    p = run_codex(gw.url, gw.new_key(), "lbl/llama", "Say hello.", tmp_path, tmp_path / "home",
                  args=("-c", f"model_instructions_file={brief}"))
    # The stand-in model rarely stops within the engine's few default tokens: Codex then reports the
    # response.incomplete event the gateway ended the stream with, which is the protocol working.
    assert p.returncode == 0 or "Incomplete response returned, reason: max_output_tokens" in p.stdout + p.stderr, \
        p.stdout[-3000:] + p.stderr[-3000:]
    rows = _rows(gw, "responses")
    assert rows and rows[-1]["status"] == 200 and rows[-1]["prompt_tokens"] > 100 and rows[-1]["cost"] == 0


def test_count_tokens_is_the_engines_count(local):
    node, gw = local
    c = anthropic.Anthropic(api_key=gw.new_key(), base_url=gw.url, max_retries=0)
    msgs = [{"role": "user", "content": "How many tokens is this?"}]
    n = c.messages.count_tokens(model="lbl/llama", messages=msgs, system="Be brief.").input_tokens
    tok = smollm_tokenizer()
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *msgs], add_generation_prompt=True,
                                   tokenize=False)
    assert n == len(tok(text, add_special_tokens=False)["input_ids"])
    m = c.messages.create(model="lbl/llama", max_tokens=4, messages=msgs, system="Be brief.")
    assert m.usage.input_tokens == n                       # what the engine counted when it answered
    assert m.stop_reason in ("end_turn", "max_tokens") and m.usage.output_tokens >= 1
