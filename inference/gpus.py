"""The node's GPUs and who holds them: a load that would over-commit a GPU's memory is refused.

Each deployment on GPUs declares `gpu_memory`, the share of each of its GPUs it may take (vLLM's
--gpu-memory-utilization). The shares of the deployments holding a GPU (loading, ready or
draining) must not add up to more than 1. Where nvidia-smi answers, the memory actually free is
checked as well, since processes outside CBorg may hold some. nvidia-smi takes up to seconds:
the node calls free_gib in a thread, off its event loop.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Iterable

from .config import DeploymentConf, NodeConf

EPS = 1e-6


@dataclass
class GPU:
    index: int
    memory_gib: float
    name: str = ""


def _smi(query: str) -> list[list[str]] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def detect(conf: NodeConf) -> list[GPU]:
    if isinstance(conf.gpus, list):
        return [GPU(g.index, g.memory_gib) for g in conf.gpus]
    rows = _smi("index,memory.total,name") or []
    return [GPU(int(r[0]), float(r[1]) / 1024, r[2]) for r in rows if len(r) >= 3 and r[0].isdigit()]


def free_gib() -> dict[int, float] | None:
    rows = _smi("index,memory.free")
    if rows is None:
        return None
    return {int(r[0]): float(r[1]) / 1024 for r in rows if len(r) >= 2 and r[0].isdigit()}


def refusal(dep: DeploymentConf, gpus: list[GPU], holders: Iterable[DeploymentConf],
            releasing: Iterable[DeploymentConf] = (), free: dict[int, float] | None = None) -> str | None:
    """Why `dep` cannot load next to `holders` (None: it can). `releasing` will have let go by then;
    `free` is free_gib()'s answer (None: the declared shares alone)."""
    if not dep.gpus:
        return None
    have = {g.index: g for g in gpus}
    missing = [i for i in dep.gpus if i not in have]
    if missing:
        return (f"cannot load {dep.name}: this node has no GPU {', '.join(map(str, missing))} "
                f"(it has {', '.join(map(str, sorted(have))) or 'none'})")
    gone = {d.name for d in releasing}
    need = dep.gpu_memory or 0.0
    for i in dep.gpus:
        others = [h for h in holders if i in h.gpus and h.name != dep.name and h.name not in gone]
        used = sum(h.gpu_memory or 0.0 for h in others)
        if used + need > 1.0 + EPS:
            who = ", ".join(f"{h.name} ({h.gpu_memory:g})" for h in others)
            return (f"cannot load {dep.name}: GPU {i} would be over-committed: {who} already hold "
                    f"{used:g} of its {have[i].memory_gib:g} GiB and {dep.name} needs {need:g}; "
                    "unload or swap one of them first")
    if free:
        for i in dep.gpus:
            want = need * have[i].memory_gib
            releasing_here = sum((d.gpu_memory or 0.0) * have[i].memory_gib for d in releasing if i in d.gpus)
            if i in free and free[i] + releasing_here + 0.5 < want:
                return (f"cannot load {dep.name}: GPU {i} has {free[i]:.1f} GiB free and {dep.name} needs "
                        f"{want:.1f} GiB (memory held outside CBorg?)")
    return None
