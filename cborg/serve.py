"""`cborg serve`: the gateway and a local inference node, on one machine, with one command.

The node (`cborg node`, the profile's only node, CPU profile by default) runs in a child
process with a fresh random token that only this gateway knows; the gateway runs here. The
first start prepares the weights (the node shows the progress; the result is cached). Once
every deployment that loads at start is ready or has failed, one plain line says so, with what
is served and what is not.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from urllib.parse import urlsplit


def _say(msg: str) -> None:
    print(f"cborg serve: {msg}", file=sys.stderr, flush=True)


async def _announce(gw, url: str, node_proc: subprocess.Popen) -> None:
    """Say 'ready' once the node's start-up loads are over (ready or failed)."""
    reg = gw.nodes
    shown = ""
    while True:
        await asyncio.sleep(0.5)
        if node_proc.poll() is not None:
            _say(f"the inference node exited with code {node_proc.returncode}; lbl/* models are unavailable")
            return
        nodes = [n for n in reg.nodes.values() if n.up]
        if not nodes:
            continue
        deps = [d for n in nodes for d in n.status.get("deployments", []) if d.get("autoload")]
        waiting = [d for d in deps if d.get("state") == "loading"]
        if waiting:
            line = ", ".join(f"{d['model']} ({d.get('phase') or 'loading'})" for d in waiting)
            if line != shown:
                _say(f"loading: {line}")
                shown = line
            continue
        ready = sorted({d["model"] for d in deps if d.get("state") == "ready"})
        failed = [d for d in deps if d.get("state") == "failed"]
        _say(f"ready on {url}: {', '.join(ready) or 'no local model'} served by the local "
             f"{reg.profile.upper()} node")
        for d in failed:
            _say(f"{d['model']} failed to load: {d.get('last_error')} (log: {d.get('log')})")
        for m, why in reg.unserved.items():
            _say(f"{m} is not served: {why}")
        return


def serve(host: str, port: int, profile: str | None, node_port: int | None, log_level: str) -> None:
    import uvicorn

    from common.logs import setup_logging
    from common.server import server_options
    from inference.config import load_inference
    from router.app import create_app, freeze_start_up
    from router.catalog import ConfigError
    from router.config import Settings

    settings = Settings.from_env()
    profile = profile or settings.profile or "cpu"
    try:
        conf = load_inference(settings.config_path, profile)
        nc = conf.node(None)
    except ConfigError as e:
        sys.exit(f"cborg: {e}")
    node_port = node_port or urlsplit(nc.url).port or 8101
    token = secrets.token_urlsafe(32)
    env = {**os.environ, nc.token_env: token, "CBORG_CONFIG": str(settings.config_path)}
    _say(f"starting the local inference node ({profile} profile, {len(conf.deployments_of(nc.name))} "
         f"deployments) on 127.0.0.1:{node_port}")
    # Through the launcher: the node (and so its engines) ends if this process is killed.
    node = subprocess.Popen([sys.executable, "-m", "inference.engines.launch", sys.executable, "-m", "cborg.cli",
                             "node", "--profile", profile, "--name", nc.name, "--host", "127.0.0.1",
                             "--port", str(node_port), "--log-level", "warning"],
                            env={**env, "CBORG_NODE_PID": str(os.getpid())})
    try:
        settings.profile = profile
        settings.nodes = [{"name": nc.name, "url": f"http://127.0.0.1:{node_port}", "token": token}]
        settings.node_poll_s = 1.0
        app = freeze_start_up(create_app(settings))
        gw = app.state
        url = f"http://{host}:{port}"
        announce: list[asyncio.Task] = []

        async def after_start() -> None:
            announce.append(asyncio.get_running_loop().create_task(_announce(gw, url, node)))

        async def before_stop() -> None:
            # Here, not after uvicorn.run: uvicorn re-raises SIGTERM/SIGINT once it has shut down.
            for t in announce:
                t.cancel()
            await asyncio.get_running_loop().run_in_executor(None, _stop_node, node)

        gw.after_start.append(after_start)
        gw.before_stop.append(before_stop)
        setup_logging(log_level)
        uvicorn.run(app, **server_options(host=host, port=port, log_level=log_level))
    finally:
        _stop_node(node)


def _stop_node(node: subprocess.Popen) -> None:
    if node.poll() is None:
        _say("stopping the local inference node")
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
