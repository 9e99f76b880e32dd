"""GPU smoke test of an inference node: the transformers and embeddings engines on CUDA, through a
real `cborg node` and gateway, with small random-weight models built here (no hub access needed).

Checks: chat (plain and streamed), completions and embeddings answer through the gateway;
concurrent embeddings share forward passes; a load that would over-commit the GPU is refused
and the same load fits once another deployment is unloaded; a killed engine is restarted;
unload ends the engine process and nvidia-smi shows its memory returned.

    python scripts/gpu_smoke.py [--out DIR] [--device cpu]    (cpu: a dry run of the same steps)

Prints a JSON summary (and writes DIR/gpu_smoke.json). Needs torch, transformers,
sentence-transformers and tokenizers, plus CBorg's own dependencies.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
MASTER = "mk-smoke-" + secrets.token_hex(8)
TOKEN = secrets.token_urlsafe(16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smi(query: str, what: str = "gpu") -> list[list[str]]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-{what}={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[c.strip() for c in ln.split(",")] for ln in out.strip().splitlines() if ln.strip()]


def used_mib() -> int | None:
    rows = smi("index,memory.used")
    return int(rows[0][1]) if rows else None


def apps() -> dict[int, int]:
    return {int(r[0]): int(r[1]) for r in smi("pid,used_memory", "compute-apps") if r and r[0].isdigit()}


def build_models(root: Path, big: bool) -> tuple[Path, Path]:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as stm
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [f"Sample {i} of the beamline ran at {i % 300} kelvin; the detector counted {i * 7 % 1000} photons."
              for i in range(3000)] + ["The capital of France is Paris.", "Hello, how are you today?"] * 50
    # causal LM: byte-level BPE with Gemma's turn markers, random Llama weights
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    lm = root / "lm"
    fast.save_pretrained(lm)
    dims = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=16,
                num_key_value_heads=4) if big else \
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg = LlamaConfig(vocab_size=len(fast), max_position_embeddings=4096, bos_token_id=fast.bos_token_id,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, **dims)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16 if big else torch.float32).save_pretrained(lm)
    # embeddings: WordPiece + random BERT, mean pooling, normalized (as sentence-transformers saves it)
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=3000, special_tokens=[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    wp.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                      special_tokens=[("[CLS]", wp.token_to_id("[CLS]")),
                                                                      ("[SEP]", wp.token_to_id("[SEP]"))])
    wp.decoder = decoders.WordPiece()
    bert = root / "bert"
    PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(bert)
    BertModel(BertConfig(vocab_size=wp.get_vocab_size(), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, max_position_embeddings=512)).save_pretrained(bert)
    t = stm.Transformer(str(bert), max_seq_length=256)
    dim = t.get_embedding_dimension() if hasattr(t, "get_embedding_dimension") else t.get_word_embedding_dimension()
    st = root / "st"
    SentenceTransformer(modules=[t, stm.Pooling(dim, "mean"), stm.Normalize()], device="cpu").save(str(st))
    return lm, st


def write_config(tmp: Path, node_port: int, lm: Path, st: Path, cuda: bool) -> Path:
    conf = yaml.safe_load((ROOT / "models.yaml").read_text())
    for a in conf.get("aliases", []):
        if a.get("system_prompt"):
            a["system_prompt"] = str(ROOT / a["system_prompt"])
    dev = "cuda" if cuda else "cpu"
    tf = {"device": dev, "dtype": "bfloat16" if cuda else "float32", "default_max_tokens": 16}
    conf["profiles"]["smoke"] = {
        "nodes": [{"name": "g", "url": f"http://127.0.0.1:{node_port}", "drain_grace_s": 0.5,
                   "gpus": "auto" if cuda else [{"index": 0, "memory_gib": 80}]}],
        "deployments": [
            {"name": "lm-cuda", "model": "lbl/llama", "node": "g", "engine": "transformers", "weights": str(lm),
             "served_model_name": "smoke/llama-random", "chat_template": "gemma", "max_model_len": 2048,
             "gpus": [0], "gpu_memory": 0.3, "transformers": tf},
            {"name": "emb-cuda", "model": "lbl/nomic-embed-text", "node": "g", "engine": "embeddings",
             "weights": str(st), "served_model_name": "smoke/bert-random", "gpus": [0], "gpu_memory": 0.1,
             "embeddings": {"device": dev, "query_prefix": "search_query: ", "document_prefix": "search_document: ",
                            "matryoshka_min_dimensions": 64, "max_wait_ms": 5}},
            {"name": "big", "model": "lbl/qwen-coder", "node": "g", "engine": "transformers", "weights": str(lm),
             "served_model_name": "smoke/llama-random", "chat_template": "gemma", "autoload": False,
             "gpus": [0], "gpu_memory": 0.7, "transformers": tf}]}
    p = tmp / "models.yaml"
    p.write_text(yaml.safe_dump(conf, sort_keys=False))
    return p


class Stack:
    def __init__(self, tmp: Path, cfg: Path, node_port: int):
        self.tmp = tmp
        self.gw_port = free_port()
        self.gw = f"http://127.0.0.1:{self.gw_port}"
        self.node = f"http://127.0.0.1:{node_port}"
        env = {**os.environ, "CBORG_CONFIG": str(cfg), "CBORG_PROFILE": "smoke", "CBORG_NODE_TOKEN": TOKEN,
               "CBORG_HOME": str(tmp / "home"), "CBORG_DATABASE_URL": f"sqlite:///{tmp / 'gw.db'}",
               "CBORG_MASTER_KEY": MASTER, "CBORG_NODE_POLL_S": "0.5", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "cborg.cli", "node", "--log-level", "warning"], env=env, cwd=ROOT,
                             stdout=open(tmp / "node.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True),
            subprocess.Popen([sys.executable, "-m", "cborg.cli", "router", "--port", str(self.gw_port),
                              "--log-level", "warning"], env=env, cwd=ROOT, stdout=open(tmp / "gw.log", "wb"),
                             stderr=subprocess.STDOUT, start_new_session=True)]

    def admin(self, method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(method, self.gw + path, headers={"Authorization": f"Bearer {MASTER}"}, timeout=60, **kw)

    def deployment(self, name: str) -> dict:
        st = httpx.get(self.node + "/status", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
        return next(d for d in st["deployments"] if d["name"] == name)

    def wait(self, name: str, state: str, timeout: float = 300, pred=None) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                d = self.deployment(name)
                if d["state"] == state and (pred is None or pred(d)):
                    return d
                if d["state"] == "failed":
                    raise RuntimeError(f"{name} failed: {d['last_error']}")
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{name} not {state}; node log:\n{(self.tmp / 'node.log').read_text()[-3000:]}")

    def wait_gateway(self, model: str, state: str = "ready", timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.admin("GET", "/admin/models/status").json()["models"].get(model, {}).get("state") == state:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"gateway: {model} not {state}")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or ".")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    a = ap.parse_args()
    cuda = a.device == "cuda"
    r: dict = {"device": a.device, "gpu": smi("name,memory.total,driver_version")}
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="cborg-gpu-smoke-"))
    lm, st = build_models(tmp / "models", big=cuda)
    r["build_models_s"] = round(time.time() - t0, 1)
    node_port = free_port()
    cfg = write_config(tmp, node_port, lm, st, cuda)
    r["used_mib_before"] = used_mib()
    stack = Stack(tmp, cfg, node_port)
    try:
        t1 = time.time()
        lm_d = stack.wait("lm-cuda", "ready")
        emb_d = stack.wait("emb-cuda", "ready")
        stack.wait_gateway("lbl/llama")
        stack.wait_gateway("lbl/nomic-embed-text")
        r["engines_ready_s"] = round(time.time() - t1, 1)
        time.sleep(1)
        r["used_mib_loaded"] = used_mib()
        r["apps_loaded"] = {str(k): v for k, v in apps().items()}
        r["engine_pids"] = {"lm-cuda": lm_d["pid"], "emb-cuda": emb_d["pid"]}
        key = stack.admin("POST", "/key/generate", json={"user_id": "smoke@lbl.gov"}).json()["key"]
        h = {"Authorization": f"Bearer {key}"}
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        t = time.time()
        c = httpx.post(stack.gw + "/v1/chat/completions", headers=h, timeout=120,
                       json={"model": "lbl/llama", "messages": msgs, "max_tokens": 64, "temperature": 0}).json()
        r["chat"] = {"model": c["model"], "usage": c["usage"], "finish_reason": c["choices"][0]["finish_reason"],
                     "seconds": round(time.time() - t, 3), "text_chars": len(c["choices"][0]["message"]["content"])}
        with httpx.stream("POST", stack.gw + "/v1/chat/completions", headers=h, timeout=120, json={
                "model": "lbl/llama", "messages": msgs, "max_tokens": 16, "stream": True,
                "stream_options": {"include_usage": True}}) as s:
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        r["stream"] = {"events": len(lines), "done": lines[-1] == "data: [DONE]",
                       "usage": json.loads(lines[-2][6:]).get("usage")}
        cm = httpx.post(stack.gw + "/v1/completions", headers=h, timeout=120,
                        json={"model": "lbl/llama", "prompt": "Sample 3 of", "max_tokens": 8}).json()
        r["completions"] = {"model": cm["model"], "usage": cm["usage"]}
        e = httpx.post(stack.gw + "/v1/embeddings", headers=h, timeout=60, json={
            "model": "lbl/nomic-embed-text", "input": ["doc one", "doc two"], "encoding_format": "float"}).json()
        e64 = httpx.post(stack.gw + "/v1/embeddings", headers=h, timeout=60, json={
            "model": "lbl/nomic-embed-text", "input": "a query", "dimensions": 64, "encoding_format": "float"}).json()
        norm = sum(x * x for x in e64["data"][0]["embedding"]) ** 0.5
        r["embeddings"] = {"model": e["model"], "dims": len(e["data"][0]["embedding"]), "usage": e["usage"],
                           "dims_64": len(e64["data"][0]["embedding"]), "norm_64": round(norm, 6)}
        eng = stack.deployment("emb-cuda")
        stats = lambda: httpx.get(eng["url"].removesuffix("/v1") + "/stats",  # noqa: E731
                                  headers={"Authorization": f"Bearer {eng['api_key']}"}).json()
        s0 = stats()

        async def burst():
            async with httpx.AsyncClient(timeout=60) as cl:
                return await asyncio.gather(*[cl.post(stack.gw + "/v1/embeddings", headers=h, json={
                    "model": "lbl/nomic-embed-text", "input": f"text {i}"}) for i in range(32)])
        codes = [x.status_code for x in asyncio.run(burst())]
        s1 = stats()
        r["burst32"] = {"ok": codes.count(200), "forward_passes": s1["forward_passes"] - s0["forward_passes"]}
        ref = stack.admin("POST", "/admin/models/load", json={"name": "big"})
        r["overcommit_refused"] = {"status": ref.status_code, "message": ref.json().get("error", {}).get("message")}
        # a killed engine comes back, and its memory with the old process goes
        os.kill(eng["pid"], signal.SIGKILL)
        back = stack.wait("emb-cuda", "ready", pred=lambda d: d["pid"] not in (None, eng["pid"]))
        time.sleep(1)
        r["restart"] = {"restarts": back["restarts"], "last_error": (back["last_error"] or "")[:80],
                        "old_pid_in_nvidia_smi": eng["pid"] in apps()}
        # unload gives the memory back
        before = used_mib()
        u = stack.admin("POST", "/admin/models/unload", json={"name": "lm-cuda"})
        stack.wait("lm-cuda", "stopped", timeout=120)
        time.sleep(1)
        after = used_mib()
        r["unload_lm"] = {"status": u.status_code, "used_mib_before": before, "used_mib_after": after,
                          "freed_mib": None if before is None else before - after,
                          "lm_pid_in_nvidia_smi": lm_d["pid"] in apps(), "apps_after": {str(k): v for k, v in apps().items()}}
        ok = stack.admin("POST", "/admin/models/load", json={"name": "big"})
        big = stack.wait("big", "ready")
        r["big_after_unload"] = {"status": ok.status_code, "state": big["state"]}
        for name in ("big", "emb-cuda"):
            stack.admin("POST", "/admin/models/unload", json={"name": name})
            stack.wait(name, "stopped", timeout=120)
        time.sleep(1)
        r["used_mib_all_unloaded"] = used_mib()
        r["apps_all_unloaded"] = {str(k): v for k, v in apps().items()}
        if cuda:
            import torch
            free, total = torch.cuda.mem_get_info()
            r["torch_mem_get_info_gib"] = {"free": round(free / 2**30, 2), "total": round(total / 2**30, 2)}
    except Exception as ex:  # noqa: BLE001 - report what happened, with the logs
        r["error"] = repr(ex)
        r["node_log_tail"] = (tmp / "node.log").read_text(errors="replace")[-4000:]
        for f in (tmp / "home" / "logs" / "g").glob("*.log"):
            r[f"log_{f.stem}"] = f.read_text(errors="replace")[-2500:]
    finally:
        stack.stop()
    r["total_s"] = round(time.time() - t0, 1)
    out = json.dumps(r, indent=2)
    print(out)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "gpu_smoke.json").write_text(out)
    if "error" in r:
        sys.exit(f"failed; models and logs kept in {tmp}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
