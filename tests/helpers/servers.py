"""Run real HTTP servers on free loopback ports for tests, and always stop them."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, ok=(200,), proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code in ok:
                return
            last = r.status_code
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer in {timeout}s (last: {last})")


class ASGIServer:
    """An ASGI app served by uvicorn in a thread of this process."""

    def __init__(self, app, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                             loop="asyncio", http="httptools", access_log=False, log_config=None)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.app = app

    def start(self) -> "ASGIServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class AiohttpServer:
    """An aiohttp.web application (the provider mocks) on its own loop in a thread."""

    def __init__(self, app, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self._runner = None

    def _run(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self.loop)

        async def start():
            self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await site.start()
            self._ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()
        self.loop.run_until_complete(self._runner.cleanup())
        self.loop.close()

    def start(self) -> "AiohttpServer":
        self.thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("mock did not start")
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Proc:
    """A subprocess (a gateway replica, a node) with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT):
        self.log = log
        self._fh = open(log, "wb")
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.p = subprocess.Popen(args, env=full_env, stdout=self._fh, stderr=subprocess.STDOUT, cwd=cwd,
                                  start_new_session=True)

    def output(self) -> str:
        if not self._fh.closed:
            self._fh.flush()
        return self.log.read_text(errors="replace")

    def stop(self, sig=None, timeout: float = 15) -> int:
        import signal
        if self.p.poll() is None:
            self.p.send_signal(sig or signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self._fh.close()
        return self.p.returncode


def gateway_proc(port: int, env: dict[str, str], log: Path, extra: list[str] | None = None) -> Proc:
    return Proc([sys.executable, "-m", "cborg.cli", "router", "--port", str(port), "--log-level", "info",
                 *(extra or [])], env, log)
