"""Engines: OpenAI-compatible servers the node runs, one process per deployment.

`command(dep, spec_path, weights, host, port)` gives the argv, extra environment and health path
of a deployment's engine process; the node starts it through `inference.engines.launch`.
"""
from __future__ import annotations

import sys

from ..config import DeploymentConf
from . import vllm


def command(dep: DeploymentConf, spec_path: str, weights: str, host: str, port: int,
            api_key: str) -> tuple[list[str], dict[str, str]]:
    if dep.engine == "vllm":
        return vllm.argv(dep, weights, host, port), {"VLLM_API_KEY": api_key}
    module = {"transformers": "inference.engines.transformers_server",
              "embeddings": "inference.engines.embeddings_server"}[dep.engine]
    return [sys.executable, "-m", module, "--spec", spec_path], {"CBORG_ENGINE_KEY": api_key}
