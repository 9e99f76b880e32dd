"""Claude Code and Codex CLI for real, non-interactive, against a gateway whose providers are the loopback
mocks: one model of each provider family, a tool-use round trip (the agent reads a file in a temporary
directory and answers with its content), and Claude Code's bearer-token set-up."""
from __future__ import annotations

import pytest

from tests.helpers.agents import run_claude, run_codex
from tests.mocks.openai_mock import Scripted

pytestmark = pytest.mark.timeout(900)

# One model of each provider family: native for anthropic/* on /v1/messages and openai/* on /v1/responses,
# translated for every other pair.
FAMILIES = ["anthropic/claude-haiku", "openai/gpt-4o-mini", "xai/grok", "google/gemini-flash", "aws/llama-3.1-8b"]
UNDERLYING = {"anthropic/claude-haiku": "claude-haiku-4-5", "openai/gpt-4o-mini": "gpt-4o-mini", "xai/grok": "grok-3",
              "google/gemini-flash": "gemini-2.5-flash", "aws/llama-3.1-8b": "meta.llama3-1-8b-instruct-v1:0"}
PROVIDER = {m: m.split("/")[0] for m in FAMILIES}


def ledger(cgw, key_id: str | None = None) -> list[dict]:
    import time
    time.sleep(0.7)                                   # one ledger flush
    return cgw.run(cgw.gw.store.ledger_rows(key_id))


def _key_id(cgw, key: str) -> str:
    from router.auth import hash_key
    return cgw.run(cgw.gw.store.key_by_hash(hash_key(key))).id


@pytest.mark.parametrize("model", FAMILIES)
def test_claude_code_round_trip(cgw, fresh, tmp_path, model):
    key = cgw.new_key("claude@lbl.gov")
    mock = fresh.by_provider(PROVIDER[model])
    mock.script.append(Scripted(text=f"Hello from {model}"))
    out = run_claude(cgw.url, key, model, "Say hello.", tmp_path, tmp_path / "home")
    assert out["is_error"] is False, out
    assert out["result"] == f"Hello from {model}"
    sent = [r for r in mock.requests if UNDERLYING[model] in (r.get("raw") or b"").decode(errors="replace")
            + r["path"]]
    assert sent, "the provider mock never saw the model"
    assert not any(key in str(r["headers"]) for r in mock.requests)   # the researcher's key stays here
    if PROVIDER[model] == "anthropic":   # passed through: Claude Code's beta flags and fields reach Anthropic
        h = {k.lower(): v for k, v in sent[-1]["headers"].items()}
        assert "claude-code-20250219" in h["anthropic-beta"]
        assert "context_management" in sent[-1]["json"]
    rows = [r for r in ledger(cgw, _key_id(cgw, key)) if r["endpoint"] == "messages"]
    assert rows and all(r["status"] == 200 and r["cost"] > 0 and r["prompt_tokens"] > 0 for r in rows)


@pytest.mark.parametrize("model", FAMILIES)
def test_codex_round_trip(cgw, fresh, tmp_path, model):
    key = cgw.new_key("codex@lbl.gov")
    mock = fresh.by_provider(PROVIDER[model])
    mock.script.append(Scripted(text=f"Hello from {model}"))
    p = run_codex(cgw.url, key, model, "Say hello.", tmp_path, tmp_path / "home")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().endswith(f"Hello from {model}"), p.stdout[-2000:]
    if PROVIDER[model] == "openai":      # passed through to OpenAI's own /v1/responses
        assert any(r["path"] == "/v1/responses" for r in mock.requests)
    rows = [r for r in ledger(cgw, _key_id(cgw, key)) if r["endpoint"] == "responses"]
    assert rows and all(r["status"] == 200 and r["cost"] > 0 for r in rows)


@pytest.mark.parametrize("model", ["anthropic/claude-sonnet", "openai/gpt-4o"])
def test_claude_code_reads_a_file(cgw, fresh, tmp_path, model):
    """The mock asks for the Read tool; Claude Code runs it and sends the result back; the mock answers
    with what the tool said."""
    f = tmp_path / "work" / "secret.txt"
    f.parent.mkdir()
    f.write_text("the answer is 4172\n")
    fresh.by_provider(model.split("/")[0]).script.append(Scripted(tool=("Read", {"file_path": str(f)})))
    out = run_claude(cgw.url, cgw.new_key(), model, "What does secret.txt say?", f.parent, tmp_path / "home",
                     bearer=True, args=("--allowedTools", "Read"))
    assert out["is_error"] is False, out
    assert "the answer is 4172" in out["result"]


@pytest.mark.parametrize("model", ["openai/gpt-4o", "anthropic/claude-sonnet"])
def test_codex_reads_a_file(cgw, fresh, tmp_path, model):
    work = tmp_path / "work"
    work.mkdir()
    (work / "secret.txt").write_text("the answer is 4172\n")
    fresh.by_provider(model.split("/")[0]).script.append(Scripted(tool=("exec_command", {"cmd": "cat secret.txt"})))
    p = run_codex(cgw.url, cgw.new_key(), model, "What does secret.txt say?", work, tmp_path / "home")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "the answer is 4172" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
