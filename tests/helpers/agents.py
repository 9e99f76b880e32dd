"""Claude Code and Codex CLI, run non-interactively against a gateway as a researcher would set them up
(README: "Coding agents"). They are installed from npm by the test set-up (scripts/_env.sh,
cborg_agents_env) into CBORG_AGENTS_DIR (default ~/.cache/cborg/agents), outside the checkout."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

AGENTS_DIR = Path(os.environ.get("CBORG_AGENTS_DIR") or Path.home() / ".cache" / "cborg" / "agents")
QUIET = {"DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1", "DISABLE_ERROR_REPORTING": "1",
         "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "NO_COLOR": "1"}


def agent_bin(name: str) -> Path:
    """The agent's executable; a skip with the reason where it is not installed (a failure in CI)."""
    p = AGENTS_DIR / "node_modules" / ".bin" / name
    if not p.exists():
        msg = (f"{name} is not installed in {AGENTS_DIR}: run the test set-up (scripts/test installs "
               "@anthropic-ai/claude-code and @openai/codex there)")
        if os.environ.get("CBORG_REQUIRE_SERVICES") == "1" or os.environ.get("CBORG_REQUIRE_AGENTS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return p


def _env(home: Path, extra: dict[str, str]) -> dict[str, str]:
    keep = {k: os.environ[k] for k in ("PATH", "LANG", "TMPDIR") if k in os.environ}
    return {**keep, "HOME": str(home), **QUIET, **extra}


def run_claude(url: str, key: str, model: str, prompt: str, cwd: Path, home: Path, bearer: bool = False,
               extra_env: dict[str, str] | None = None, args: tuple[str, ...] = (), timeout: float = 300) -> dict:
    """`claude -p PROMPT --model M --output-format json`: its result object (`result`, `usage`, `is_error`)."""
    home.mkdir(parents=True, exist_ok=True)
    auth = {"ANTHROPIC_AUTH_TOKEN": key} if bearer else {"ANTHROPIC_API_KEY": key}
    p = subprocess.run([str(agent_bin("claude")), "-p", prompt, "--model", model, "--output-format", "json", *args],
                       cwd=cwd, env=_env(home, {"ANTHROPIC_BASE_URL": url, **auth, **(extra_env or {})}),
                       capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"claude exited {p.returncode}: {p.stdout[-2000:]}\n{p.stderr[-3000:]}") from None


def codex_config(url: str) -> str:
    """The README's Codex set-up: a model provider speaking the Responses API at the gateway."""
    return ("model_provider = \"cborg\"\ncheck_for_update_on_startup = false\n\n"
            "[model_providers.cborg]\nname = \"CBorg\"\n"
            f"base_url = \"{url}/v1\"\nenv_key = \"CBORG_API_KEY\"\nwire_api = \"responses\"\n\n"
            "[analytics]\nenabled = false\n")


def run_codex(url: str, key: str, model: str, prompt: str, cwd: Path, home: Path, args: tuple[str, ...] = (),
              timeout: float = 300) -> subprocess.CompletedProcess:
    """`codex exec --skip-git-repo-check -m M PROMPT`; the last message is on stdout."""
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    (home / ".codex" / "config.toml").write_text(codex_config(url))
    return subprocess.run([str(agent_bin("codex")), "exec", "--skip-git-repo-check", "-m", model, *args, prompt],
                          cwd=cwd, env=_env(home, {"CBORG_API_KEY": key}), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
