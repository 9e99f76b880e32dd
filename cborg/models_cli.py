"""`cborg models status | load | unload | swap`: the GPU admin's commands, through the gateway.

They call the gateway's admin API (router/api/models_admin.py) with CBORG_MASTER_KEY at
--url / CBORG_URL; the gateway forwards to the nodes. By default load, unload and swap wait
until the deployments concerned settle (ready, stopped or failed), showing each change.
"""
from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request


class AdminError(Exception):
    pass


def _call(url: str, method: str, path: str, body: dict | None = None) -> dict:
    key = os.environ.get("CBORG_MASTER_KEY")
    if not key:
        raise AdminError("set CBORG_MASTER_KEY (the gateway's master key)")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except Exception:  # noqa: BLE001
            msg = e.reason
        raise AdminError(f"HTTP {e.code}: {msg}") from None
    except urllib.error.URLError as e:
        raise AdminError(f"cannot reach the gateway at {url}: {e.reason}") from None


def _age(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def print_status(st: dict, out=sys.stdout) -> None:
    rows = [("NODE", "DEPLOYMENT", "MODEL", "ENGINE", "STATE", "GPUS", "SINCE", "RESTARTS", "DETAIL")]
    for n in st["nodes"]:
        if not n["up"]:
            rows.append((n["name"], "-", "-", "-", "DOWN", "-", _age(n.get("last_seen")), "-", n.get("error") or ""))
            continue
        for d in n["deployments"]:
            detail = d.get("phase") or ""
            if d.get("state") == "failed" or (d.get("last_error") and d.get("state") != "ready"):
                detail = (detail + " " if detail else "") + f"last error: {(d.get('last_error') or '')[:120]}"
            gpus = ",".join(map(str, d.get("gpus") or [])) or "cpu"
            if d.get("gpu_memory"):
                gpus += f" ({d['gpu_memory']:g})"
            rows.append((n["name"], d["name"], d["model"], d["engine"], d["state"], gpus, _age(d.get("since")),
                         str(d.get("restarts", 0)), detail))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1], file=out)
    off = [(m, v) for m, v in st["models"].items() if v["state"] != "ready"]
    if off:
        print(file=out)
        for m, v in off:
            print(f"{m}: {v['state']}: {v.get('message') or ''}", file=out)


def _deployments(st: dict) -> dict[tuple[str, str], dict]:
    return {(n["name"], d["name"]): d for n in st["nodes"] for d in n.get("deployments", [])}


def _wait(url: str, targets: dict[tuple[str, str], set[str]], timeout: float) -> int:
    """Poll until every (node, deployment) reaches one of its wanted states; 1 if one failed."""
    deadline = time.time() + timeout
    seen: dict[tuple[str, str], str] = {}
    while True:
        st = _call(url, "GET", "/admin/models/status")
        deps = _deployments(st)
        done = True
        for key, want in targets.items():
            d = deps.get(key)
            state = d["state"] if d else "unknown"
            line = f"{state}{' (' + d['phase'] + ')' if d and d.get('phase') else ''}"
            if seen.get(key) != line:
                print(f"{key[0]}/{key[1]}: {line}", file=sys.stderr)
                seen[key] = line
            if state == "failed":
                print(f"{key[0]}/{key[1]} failed: {d.get('last_error')} (log: {d.get('log')})", file=sys.stderr)
                return 1
            if state not in want:
                done = False
        if done:
            return 0
        if time.time() > deadline:
            print("timed out waiting; `cborg models status` shows where things are", file=sys.stderr)
            return 1
        time.sleep(1)


def run(a) -> int:
    url = a.url
    try:
        if a.models_cmd == "status":
            st = _call(url, "GET", "/admin/models/status")
            if a.json:
                print(json.dumps(st, indent=2))
            else:
                print_status(st)
            return 0
        if a.models_cmd in ("load", "unload"):
            body = {"name": a.name, **({"node": a.node} if a.node else {})}
            r = _call(url, "POST", f"/admin/models/{a.models_cmd}", body)
            want = {"ready"} if a.models_cmd == "load" else {"stopped"}
            deps = _deployments(r)
            targets = {}
            for res in r["results"]:
                if res["status"] >= 400:
                    print(f"{res['node']}: {res['error']}", file=sys.stderr)
                    continue
                for dep in res["deployments"]:
                    d = deps.get((res["node"], dep))
                    # a model load starts one of its deployments: wait for those that started
                    if d is not None and (a.models_cmd == "unload" or d["state"] in ("loading", "ready")):
                        targets[(res["node"], dep)] = want
        else:
            body = {"model": a.name, "to": a.to, **({"node": a.node} if a.node else {})}
            r = _call(url, "POST", "/admin/models/swap", body)
            targets = {(res["node"], a.to): {"ready"} for res in r["results"] if res["status"] < 400}
        print(f"{a.models_cmd} {a.name}{' -> ' + a.to if a.models_cmd == 'swap' else ''}: accepted by "
              f"{', '.join(res['node'] for res in r['results'] if res['status'] < 400)}", file=sys.stderr)
        if not a.wait or not targets:
            return 0
        return _wait(url, targets, a.timeout)
    except AdminError as e:
        print(f"cborg models: {e}", file=sys.stderr)
        return 1
