"""One deployment's engine process: prepare weights, start, wait until ready, restart after a
crash (with backoff), drain and stop.

States: stopped -> loading -> ready -> draining -> stopped; failed after too many crashes in a
row (a start that reached ready and stayed a minute resets the count), with the last error.
The engine runs in its own process group (vLLM starts helpers), with its output appended to
LOG_DIR/DEPLOYMENT.log, and is told to die with the node (inference/engines/launch.py). It gets
the node's environment without the gateway's and the node's secrets (child_env).
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import engines
from .config import DeploymentConf, NodeConf
from .engines.server import Spec
from .engines.vllm import parse_load
from .probe import http_get
from .weights import is_local_spec, is_packaged, prepare

log = logging.getLogger("cborg.node")

ACTIVE = ("loading", "ready", "draining")
STABLE_S = 60.0       # ready this long: a later crash starts the restart count afresh
# Gateway secrets (`cborg serve` runs the node in the gateway's environment), besides the node
# token and every *_API_KEY. HF_TOKEN stays: vLLM downloads gated weights with it.
GATEWAY_SECRETS = frozenset({"CBORG_MASTER_KEY", "CBORG_DATABASE_URL", "CBORG_REDIS_URL", "AWS_ACCESS_KEY_ID",
                             "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})


def child_env(node: NodeConf) -> dict[str, str]:
    """The node's environment without the secrets an engine never needs: what it runs (a model's
    remote code, its Python packages) must not be able to read provider keys or the node token."""
    return {k: v for k, v in os.environ.items()
            if k not in GATEWAY_SECRETS and k != node.token_env and not k.endswith("_API_KEY")}


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 4000) -> str:
    """The last lines the engine wrote in its current run (after the node's start header)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - chars))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    run = text.rsplit("\n=== ", 1)
    body = run[1].split("\n", 1)[1] if len(run) == 2 and "\n" in run[1] else text
    lines = [ln.strip() for ln in body.replace("\r", "\n").splitlines() if ln.strip()][-3:]
    return " | ".join(ln[-200:] for ln in lines) or "(no output)"


def exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class EngineProcess:
    def __init__(self, dep: DeploymentConf, node: NodeConf, log_dir: Path, run_dir: Path):
        self.dep = dep
        self.node = node
        self.log_path = log_dir / f"{dep.name}.log"
        self.spec_path = run_dir / f"{dep.name}.json"
        self.state = "stopped"
        self.phase = ""                      # what it is doing now, for people
        self.since = time.time()
        self.last_error: str | None = None
        self.restarts = 0                    # crashes since the last stable start
        self.total_restarts = 0
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.api_key: str | None = None
        self.weights: str | None = None
        self.swap: dict | None = None        # {"from": [...]} or {"to": name} during a swap
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._prep: asyncio.subprocess.Process | None = None
        self._pending: object | None = None  # a swap's promise to start it; stop() withdraws it

    # -- what the node reports ----------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def _set(self, state: str, phase: str = "") -> None:
        if state != self.state:
            self.since = time.time()
            log.info("%s: %s%s", self.dep.name, state, f" ({phase})" if phase else "",
                     extra={"deployment": self.dep.name, "state": state})
        self.state = state
        self.phase = phase

    @property
    def url(self) -> str | None:
        if self.port is None:
            return None
        h = self.node.engine_host
        host = f"[{h}]" if ":" in h else h
        return f"http://{host}:{self.port}/v1"

    def status(self) -> dict:
        d = self.dep
        serving = self.state in ("ready", "draining")
        return {"name": d.name, "model": d.model, "engine": d.engine, "state": self.state, "phase": self.phase,
                "since": round(self.since, 3), "served_model_name": d.served_name, "autoload": d.autoload,
                "url": self.url if serving else None, "api_key": self.api_key if serving else None,
                "pid": self.proc.pid if self.proc is not None and self.proc.poll() is None else None,
                "restarts": self.total_restarts, "last_error": self.last_error, "gpus": d.gpus,
                "gpu_memory": d.gpu_memory, "tensor_parallel_size": d.tp_size if d.engine == "vllm" else None,
                "log": str(self.log_path), "swap": self.swap}

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Begin loading (returns at once; the state says how it goes)."""
        self._pending = None
        if self._task is not None and not self._task.done():
            return
        self._stopping = False
        self.restarts = 0
        self.last_error = None
        self._set("loading", "queued")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            if self.weights is None:
                self._set("loading", "preparing weights")
                self.weights = await self._prepare()
            while not self._stopping:
                ok = await self._start_once()
                if ok:
                    started = time.time()
                    self._set("ready")
                    code = await self._wait_exit()
                    if self._stopping:
                        return
                    if time.time() - started >= STABLE_S:
                        self.restarts = 0
                    self.last_error = f"engine {exit_text(code)}; its last output: {log_tail(self.log_path)}"
                if self._stopping:
                    return
                self.restarts += 1
                self.total_restarts += 1
                if self.restarts > self.dep.restart.max_restarts:
                    self._set("failed", f"gave up after {self.restarts - 1} restarts")
                    log.error("%s failed: %s", self.dep.name, self.last_error)
                    return
                r = self.dep.restart
                delay = min(r.max_backoff_s, r.backoff_s * 2 ** (self.restarts - 1))
                self._set("loading", f"restarting in {delay:g} s (restart {self.restarts})")
                log.warning("%s: restarting in %g s: %s", self.dep.name, delay, self.last_error)
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - report, never kill the node
            self.last_error = str(e)
            self._set("failed", "")
            log.exception("%s failed", self.dep.name)

    async def _prepare(self) -> str:
        """Weights path: `python -m inference.weights` in a subprocess (torch stays out of the node);
        its progress goes to the node's stderr, where `cborg serve` shows it."""
        if not is_local_spec(self.dep.weights):
            return prepare(self.dep.weights)
        self._prep = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "inference.weights", self.dep.weights, stdout=asyncio.subprocess.PIPE,
            env={**child_env(self.node), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
        try:
            out, _ = await self._prep.communicate()
        finally:
            if self._prep.returncode is None:
                self._prep.kill()
        if self._prep.returncode != 0:
            raise RuntimeError(f"preparing weights {self.dep.weights} failed (exit {self._prep.returncode}); "
                               "see the node's output")
        return out.decode().strip().splitlines()[-1]

    async def _start_once(self) -> bool:
        d = self.dep
        host = self.node.engine_host
        self.port = free_port(host)
        self.api_key = secrets.token_urlsafe(24)
        spec = Spec(d, self.weights, host, self.port)
        self.spec_path.write_text(spec.to_json())
        argv, env = engines.command(d, str(self.spec_path), self.weights, host, self.port, self.api_key)
        # PCI bus order: CUDA's GPU numbers are then nvidia-smi's, which the node's GPU indices are.
        env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", **child_env(self.node), **env, **d.env,
               "CBORG_NODE_PID": str(os.getpid()), "CUDA_VISIBLE_DEVICES": ",".join(map(str, d.gpus)),
               "PYTHONUNBUFFERED": "1"}
        if is_packaged(d.weights):
            env.setdefault("HF_HUB_OFFLINE", "1")   # packaged weights: nothing to fetch
        self._set("loading", "starting the engine")
        with open(self.log_path, "ab") as fh:
            fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {d.name}: {' '.join(argv)}\n".encode())
            fh.flush()
            self.proc = subprocess.Popen([sys.executable, "-m", "inference.engines.launch", *argv], env=env,
                                         stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self._set("loading", "waiting for the engine to answer /health")
        deadline = time.time() + d.startup_timeout_s
        while time.time() < deadline:
            if self._stopping:
                return False
            if self.proc.poll() is not None:
                self.last_error = f"engine {exit_text(self.proc.returncode)} while starting; its last output: " \
                                  f"{log_tail(self.log_path)}"
                return False
            try:
                status, _ = await http_get(host, self.port, "/health", timeout=2)
                if status == 200:
                    return True
            except (OSError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.5)
        self.last_error = f"engine did not answer /health within {d.startup_timeout_s:g} s"
        await self._kill()
        return False

    async def _wait_exit(self, timeout: float | None = None) -> int | None:
        """The exit code (polled: no thread held per engine); None if still running at the timeout."""
        proc = self.proc
        deadline = None if timeout is None else time.time() + timeout
        while proc.poll() is None:
            if deadline is not None and time.time() >= deadline:
                return None
            await asyncio.sleep(0.2)
        return proc.returncode

    async def load(self) -> int:
        """Requests the engine is running or holding (for draining); 0 when it cannot say."""
        if self.port is None or self.proc is None or self.proc.poll() is not None:
            return 0
        hdr = {"Authorization": f"Bearer {self.api_key}"}
        try:
            if self.dep.engine == "vllm":
                status, body = await http_get(self.node.engine_host, self.port, "/metrics", hdr, timeout=3)
                return parse_load(body.decode("utf-8", "replace")) if status == 200 else 0
            status, body = await http_get(self.node.engine_host, self.port, "/stats", hdr, timeout=3)
            if status != 200:
                return 0
            import json
            s = json.loads(body)
            return int(s.get("running", 0)) + int(s.get("queued", 0))
        except (OSError, asyncio.TimeoutError, ValueError):
            return 0

    def begin_drain(self, phase: str = "waiting for in-flight requests") -> None:
        """Out of rotation now (gateways see it at their next poll); stop() finishes the job."""
        if self.state == "ready":
            self._set("draining", phase)

    def pending(self, phase: str) -> object:
        """Shown as loading before its start (a swap waits for the old deployment to go). Returns
        the token to start it with (start_pending): an unload or another swap meanwhile voids it."""
        self._set("loading", phase)
        self._pending = token = object()
        return token

    def start_pending(self, token: object) -> bool:
        """Start it if what made it pending still stands; False if it was stopped since."""
        if self._pending is not token:
            return False
        self.start()
        return True

    async def stop(self, drain: bool = True) -> None:
        """Drain (gateways stop sending; in-flight requests finish, bounded wait), then end the
        process group and wait for it, so its memory is returned before this returns."""
        self._pending = None
        if self.state == "stopped" and (self.proc is None or self.proc.poll() is not None):
            return
        self._stopping = True
        if drain and self.state in ("ready", "draining"):
            self.begin_drain()
            deadline = time.time() + self.node.drain_grace_s + self.node.drain_timeout_s
            await asyncio.sleep(self.node.drain_grace_s)   # every gateway polls within this
            while time.time() < deadline and await self.load() > 0:
                await asyncio.sleep(0.25)
        if self._prep is not None and self._prep.returncode is None:
            self._prep.kill()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except BaseException:  # noqa: BLE001
                pass
        await self._kill()
        self.port = None
        self.api_key = None
        self._set("stopped", "")

    async def _kill(self, grace: float = 20.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            if await self._wait_exit(wait) is not None:
                break
        # Helpers left in the group (vLLM's engine core) follow the leader, or are killed;
        # return only once none is left, so that their memory is free.
        pgid = proc.pid
        for sig in (None, signal.SIGKILL):
            if sig is not None and group_left(pgid):
                try:
                    os.killpg(pgid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.time() + 5
            while group_left(pgid) and time.time() < deadline:
                await asyncio.sleep(0.1)


def group_left(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    left = []
    try:
        names = os.listdir("/proc")
    except OSError:
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except OSError:
            return []
    for n in names:
        if not n.isdigit():
            continue
        try:
            with open(f"/proc/{n}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            left.append(int(n))
    return left
