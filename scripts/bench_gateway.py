"""Gateway overhead benchmark: added latency at concurrency 1 and throughput at concurrency 32.

The upstream is nginx answering a static provider response (100,000+ requests/s here, so the
gateway is what is measured); the load tool is wrk. The gateway runs one worker pinned to one
core (taskset), nginx and wrk share the other core. Each figure is the median of --rounds
runs, and every scenario runs in the same invocation, so ratios compare like with like.

Scenarios (each runs its own gateway process; the key has parallel, RPM, TPM and budget limits):
  passthrough     openai/gpt-4o through the OpenAI-compatible adapter; limits, budgets, ledger on
                  (the embedded default: in-process limiter + SQLite)
  accounting-off  the same with CBORG_ACCOUNTING=off (no limits, no ledger; metrics and logs stay)
  redis-postgres  the same with CBORG_REDIS_URL and CBORG_DATABASE_URL=postgresql://... (scale-out)
  anthropic       anthropic/claude-sonnet through the Anthropic translation
  messages-native     POST /v1/messages for anthropic/claude-sonnet, passed through (Claude Code's path)
  messages-openai     POST /v1/messages for openai/gpt-4o, translated to chat and back
  responses-native    POST /v1/responses for openai/gpt-4o, passed through (Codex's path)
  responses-anthropic POST /v1/responses for anthropic/claude-sonnet, translated through chat to Messages

--compare DIR also runs every scenario with the gateway of another checkout (e.g. a worktree of the
previous commit: `git worktree add /tmp/bench-old main`), as `<scenario>@base`, in the same rounds, and
prints this checkout's throughput and added p50 against it (medians of per-round ratios/differences).

--litellm VENV also runs LiteLLM's proxy from that virtual environment (`pip install 'litellm[proxy]'`
into it), one worker pinned to the gateway's core, in front of the same nginx for openai/gpt-4o, as the
scenario `litellm`, and prints passthrough's throughput and added p50 against it. LiteLLM runs with a
master key and no database (no per-key limits or spend logs): less work per request than CBorg's passthrough.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPENAI_RESPONSE = ('{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
                   '"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant",'
                   '"content":"Hello! How can I help you today?"},"finish_reason":"stop"}],'
                   '"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}')
ANTHROPIC_RESPONSE = ('{"id":"msg_bench","type":"message","role":"assistant","model":"claude-sonnet-4-5",'
                      '"content":[{"type":"text","text":"Hello! How can I help you today?"}],'
                      '"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,'
                      '"output_tokens":9,"cache_read_input_tokens":0,"cache_creation_input_tokens":0}}')

# (nginx puts a new id in each: the gateway keeps the owner of every OpenAI response id it passes on)
RESPONSES_RESPONSE = ('{"id":"resp_$request_id","object":"response","created_at":1700000000,"status":"completed",'
                      '"model":"gpt-4o-2024-08-06","output":[{"type":"message","id":"msg_bench","status":"completed",'
                      '"role":"assistant","content":[{"type":"output_text","text":"Hello! How can I help you today?",'
                      '"annotations":[]}]}],"usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":0},'
                      '"output_tokens":9,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":21}}')

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")

# scenario -> (model name, the path nginx answers on for the direct run, extra gateway env, database kind,
# the gateway's API)
SCENARIOS: dict[str, tuple] = {
    "passthrough": ("openai/gpt-4o", "/v1/chat/completions", {}, "sqlite"),
    "accounting-off": ("openai/gpt-4o", "/v1/chat/completions", {"CBORG_ACCOUNTING": "off"}, "sqlite"),
    "redis-postgres": ("openai/gpt-4o", "/v1/chat/completions",
                       {"CBORG_REDIS_URL": REDIS_URL, "CBORG_REDIS_PREFIX": f"bench{os.getpid()}:"}, "postgres"),
    "anthropic": ("anthropic/claude-sonnet", "/v1/messages", {}, "sqlite"),
    "messages-native": ("anthropic/claude-sonnet", "/v1/messages", {}, "sqlite", "messages"),
    "messages-openai": ("openai/gpt-4o", "/v1/chat/completions", {}, "sqlite", "messages"),
    "responses-native": ("openai/gpt-4o", "/v1/responses", {}, "sqlite", "responses"),
    "responses-anthropic": ("anthropic/claude-sonnet", "/v1/messages", {}, "sqlite", "responses"),
}
# Each translated agent path against the pass-through of its own API, measured in the same rounds.
AGENT_PAIRS = {"messages-openai": "messages-native", "responses-anthropic": "responses-native"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(tool: str, package: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"==> installing {package} (apt-get)", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", package], check=False, capture_output=True)
        path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    if not path:
        sys.exit(f"bench_gateway needs {tool}: apt-get install {package}")
    return path


def start_nginx(tmp: Path, port: int, cpu: str) -> subprocess.Popen:
    conf = tmp / "nginx.conf"
    def esc(s: str) -> str:
        return s.replace("'", "\\'")
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_buffer_size 64k;
  server {{
    listen 127.0.0.1:{port};
    location /v1/messages {{ default_type application/json; return 200 '{esc(ANTHROPIC_RESPONSE)}'; }}
    location /v1/responses {{ default_type application/json; return 200 '{esc(RESPONSES_RESPONSE)}'; }}
    location / {{ default_type application/json; return 200 '{esc(OPENAI_RESPONSE)}'; }}
  }}
}}
""")
    return subprocess.Popen(["taskset", "-c", cpu, need("nginx", "nginx-light"), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def lua(tmp: Path, model: str, key: str, tag: str = "", api: str = "chat") -> Path:
    p = tmp / f"post-{tag}-{re.sub(r'[^a-z0-9]', '_', model)}.lua"
    if api == "responses":
        body = '{"model":"%s","input":"Hello, how are you today?","max_output_tokens":64}' % model
    else:
        body = ('{"model":"%s","messages":[{"role":"user","content":"Hello, how are you today?"}],'
                '"max_tokens":64}' % model)
    p.write_text(f"""wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
wrk.headers["x-api-key"] = "{key}"
wrk.headers["anthropic-version"] = "2023-06-01"
""")
    return p


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its threads) so far."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, script: Path, conns: int, secs: float, cpu: str, pid: int | None = None) -> dict:
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(["taskset", "-c", cpu, need("wrk", "wrk"), "-t1", f"-c{conns}", f"-d{max(1, round(secs))}s", "--latency",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    cpu_used = cpu_seconds(pid) - cpu0 if pid else 0.0
    def ms(v: str) -> float:
        m = re.match(r"([\d.]+)(us|ms|s|m)", v)
        if m is None:
            raise RuntimeError(f"cannot read wrk output:\n{out}")
        n, u = float(m.group(1)), m.group(2)
        return n / 1000 if u == "us" else n if u == "ms" else n * 1000
    p50 = ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))
    p99 = ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = re.search(r"Socket errors:.*", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {"p50_ms": p50, "p99_ms": p99, "rps": rps, "non2xx": int(bad.group(1)) if bad else 0,
            "cpu_us": cpu_used / total * 1e6 if pid and total else 0.0,
            "socket_errors": errs.group(0) if errs else ""}


async def make_key(db_url: str) -> str:
    """A key with every limit set (high enough never to refuse), so each one is checked per request."""
    from router.key_admin import create_key
    from router.store import open_store
    store = open_store(db_url)
    await store.init()
    secret, _ = await create_key(store, "bench@lbl.gov", expires="1d", fields=dict(
        max_parallel=10_000, rpm=100_000_000, tpm=10_000_000_000, max_budget=1_000_000, budget_period="30d"))
    await store.close()
    return secret


async def pg_schema(name: str, drop: bool = False) -> str:
    import asyncpg
    c = await asyncpg.connect(PG_URL)
    await c.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    if not drop:
        await c.execute(f"CREATE SCHEMA {name}")
    await c.close()
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}search_path={name}"


def pin_services(cpu: str | None) -> None:
    """Keep Redis and PostgreSQL off the gateway's core during the run (None: back to every core)."""
    cpus = cpu or f"0-{os.cpu_count() - 1}"
    for name in ("redis-server", "postgres"):
        pids = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            subprocess.run(["taskset", "-a", "-p", "-c", cpus, pid], capture_output=True)


def bench_catalog(tmp: Path) -> Path:
    """models.yaml with the user's budget raised out of reach: every limit is still checked per
    request, none refuses (the default $50 a user runs out within a benchmark of ~200k requests)."""
    import yaml
    conf = yaml.safe_load((ROOT / "models.yaml").read_text())
    conf["limits"]["user"] = {"budget": 1e9, "budget_period": "30d"}
    for a in conf.get("aliases", []):
        if a.get("system_prompt"):
            a["system_prompt"] = str(ROOT / a["system_prompt"])
    p = tmp / "models.yaml"
    p.write_text(yaml.safe_dump(conf, sort_keys=False))
    return p


def start_gateway(port: int, env: dict, cpu: str, log: Path, root: Path = ROOT) -> subprocess.Popen:
    env = {**os.environ, **env, "PYTHONPATH": str(root)}
    p = subprocess.Popen(["taskset", "-c", cpu, sys.executable, "-m", "cborg.cli", "router", "--port", str(port),
                          "--log-level", "warning"], env=env, cwd=root,
                         stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return wait_live(p, port, log, "gateway", 30)


def wait_live(p: subprocess.Popen, port: int, log: Path, what: str, seconds: float) -> subprocess.Popen:
    """Wait for /health/liveliness (CBorg's and LiteLLM's); exit with the log's tail if the process dies."""
    import urllib.request
    for _ in range(int(seconds * 10)):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health/liveliness", timeout=1)
            return p
        except OSError:
            if p.poll() is not None:
                sys.exit(f"{what} exited: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    sys.exit(f"{what} did not start")


LITELLM_KEY = "sk-litellm-bench-" + "0123456789abcdef" * 4


def start_litellm(venv: Path, port: int, nport: int, cpu: str, tmp: Path) -> subprocess.Popen:
    """LiteLLM's proxy, one worker, for gpt-4o at nginx (a master key, no database)."""
    conf = tmp / "litellm.yaml"
    conf.write_text(f"""model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_base: http://127.0.0.1:{nport}/v1
      api_key: sk-bench-upstream
litellm_settings:
  drop_params: true
""")
    log = tmp / "litellm.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "ANTHROPIC", "CBORG"))}
    env.update(LITELLM_MASTER_KEY=LITELLM_KEY, LITELLM_LOG="ERROR", LITELLM_LOCAL_MODEL_COST_MAP="True", DISABLE_SCHEMA_UPDATE="True")
    p = subprocess.Popen(["taskset", "-c", cpu, str(venv / "bin" / "litellm"), "--config", str(conf),
                          "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
                         env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return wait_live(p, port, log, "litellm", 120)


def litellm_version(venv: Path) -> str:
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                       capture_output=True, text=True)
    return "LiteLLM " + (r.stdout.strip() or "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="passthrough", help=f"comma list of {', '.join(SCENARIOS)}")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gateway-cpu", default="1")
    ap.add_argument("--load-cpu", default="0")
    ap.add_argument("--compare", metavar="DIR", help="another checkout whose gateway runs every scenario too, "
                                                      "as <scenario>@base")
    ap.add_argument("--litellm", metavar="VENV", help="a virtual environment with litellm[proxy]: its proxy "
                                                      "runs as the scenario `litellm`")
    a = ap.parse_args()
    scen = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    for s in scen:
        if s not in SCENARIOS:
            sys.exit(f"unknown scenario {s}; known: {', '.join(SCENARIOS)}")
    roots = {s: ROOT for s in scen}
    if a.compare:
        base_root = Path(a.compare).resolve()
        if not (base_root / "cborg" / "cli.py").exists():
            sys.exit(f"--compare {a.compare}: not a CBorg checkout")
        for s in list(scen):
            roots[s + "@base"] = base_root
            scen.append(s + "@base")

    tmp = Path(tempfile.mkdtemp(prefix="cborg-bench-"))
    nport = free_port()
    nginx = start_nginx(tmp, nport, a.load_cpu)
    time.sleep(0.3)
    base_env = {"OPENAI_API_KEY": "sk-bench-upstream", "ANTHROPIC_API_KEY": "sk-ant-bench",
                "OPENAI_BASE_URL": f"http://127.0.0.1:{nport}/v1", "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{nport}",
                "XAI_API_KEY": "x", "GEMINI_API_KEY": "x", "CBORG_CONFIG": str(bench_catalog(tmp))}
    results: dict[str, dict] = {}
    procs = [nginx]
    pin_services(a.load_cpu)
    schema = f"cborg_bench_{os.getpid()}"
    try:
        # Every scenario's gateway runs for the whole benchmark (idle while another is measured), and
        # each round measures every scenario in turn: ratios then compare like moments of a shared,
        # noisy machine. Medians over rounds; ratios are medians of the per-round ratios.
        setup = {}
        for s in scen:
            model, path, extra_env, db_kind, *api = SCENARIOS[s.split("@")[0]]
            api = api[0] if api else "chat"
            db = asyncio.run(pg_schema(schema)) if db_kind == "postgres" else f"sqlite:///{tmp / (s + '.db')}"
            key = asyncio.run(make_key(db))
            port = free_port()
            gw = start_gateway(port, {**base_env, **extra_env, "CBORG_DATABASE_URL": db}, a.gateway_cpu,
                               tmp / f"gw-{s}.log", roots[s])
            procs.append(gw)
            gpath = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "responses": "/v1/responses"}[api]
            setup[s] = (gw, lua(tmp, model, key, s, api), lua(tmp, "gpt-4o", key, s + "-direct"),
                        f"http://127.0.0.1:{port}{gpath}", f"http://127.0.0.1:{nport}{path}")
            wrk(setup[s][3], setup[s][1], 32, 2, a.load_cpu)  # warm up
        if a.litellm:
            port = free_port()
            gw = start_litellm(Path(a.litellm), port, nport, a.gateway_cpu, tmp)
            procs.append(gw)
            setup["litellm"] = (gw, lua(tmp, "gpt-4o", LITELLM_KEY, "litellm"), lua(tmp, "gpt-4o", LITELLM_KEY, "litellm-direct"),
                                f"http://127.0.0.1:{port}/v1/chat/completions", f"http://127.0.0.1:{nport}/v1/chat/completions")
            wrk(setup["litellm"][3], setup["litellm"][1], 32, 2, a.load_cpu)  # warm up
            scen.append("litellm")
        rows = {s: {"direct_c1": [], "gw_c1": [], "gw_c32": [], "direct_c32": []} for s in scen}
        for _ in range(a.rounds):
            for s in scen:
                gw, script, direct, gurl, durl = setup[s]
                rows[s]["direct_c1"].append(wrk(durl, direct, 1, a.seconds, a.load_cpu))
                rows[s]["gw_c1"].append(wrk(gurl, script, 1, a.seconds, a.load_cpu))
                rows[s]["gw_c32"].append(wrk(gurl, script, 32, a.seconds, a.load_cpu, gw.pid))
        for s in scen:
            rows[s]["direct_c32"].append(wrk(setup[s][4], setup[s][2], 32, a.seconds, a.load_cpu))
            r = rows[s]
            med = lambda k, f: statistics.median(x[f] for x in r[k])  # noqa: E731
            results[s] = {
                "direct_p50_ms": med("direct_c1", "p50_ms"), "gw_p50_ms": med("gw_c1", "p50_ms"),
                "added_p50_ms": statistics.median(g["p50_ms"] - d["p50_ms"] for g, d in zip(r["gw_c1"], r["direct_c1"])),
                "gw_p99_ms_c1": med("gw_c1", "p99_ms"),
                "gw_rps_c32": med("gw_c32", "rps"), "direct_rps_c32": med("direct_c32", "rps"),
                "gw_cpu_us": med("gw_c32", "cpu_us"),
                "errors": sum(x["non2xx"] for k in r for x in r[k]),
                "rounds": r,
            }
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        pin_services(None)
        if any(x != "litellm" and SCENARIOS[x.split("@")[0]][3] == "postgres" for x in scen):
            asyncio.run(pg_schema(schema, drop=True))
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nmachine: {os.cpu_count()} cores, {platform_line()}; gateway pinned to CPU {a.gateway_cpu}, "
          f"nginx, wrk, Redis and PostgreSQL to CPU {a.load_cpu}; {a.rounds} rounds x {a.seconds:g}s, medians\n")
    print("| scenario | direct p50 (ms) | gateway p50 (ms) | added p50 (ms) | gateway p99 c=1 (ms) | gateway req/s c=32 | "
          "gateway CPU per request c=32 (us) | nginx req/s c=32 | non-2xx |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, r in results.items():
        print(f"| {s} | {r['direct_p50_ms']:.3f} | {r['gw_p50_ms']:.3f} | {r['added_p50_ms']:.3f} | "
              f"{r['gw_p99_ms_c1']:.2f} | {r['gw_rps_c32']:,.0f} | {r['gw_cpu_us']:.0f} | {r['direct_rps_c32']:,.0f} | "
              f"{r['errors']} |")
    print()
    if any(r["errors"] for r in results.values()):
        print("WARNING: some requests were not answered 200: those scenarios' figures are not comparable.\n")

    def per_round(s: str, base: str, field: str, inverse: bool = False) -> float:
        pairs = zip(results[s]["rounds"]["gw_c32"], results[base]["rounds"]["gw_c32"])
        return statistics.median((b[field] / x[field]) if inverse else (x[field] / b[field]) for x, b in pairs)

    def added_diff(s: str, base: str) -> float:
        rs, rb = results[s]["rounds"], results[base]["rounds"]
        return statistics.median((g["p50_ms"] - d["p50_ms"]) - (gb["p50_ms"] - db["p50_ms"]) for g, d, gb, db in
                                 zip(rs["gw_c1"], rs["direct_c1"], rb["gw_c1"], rb["direct_c1"]))
    if a.compare:
        print(f"base: {a.compare} ({git_head(Path(a.compare))}); this checkout: {git_head(ROOT)}")
        for s in results:
            if s + "@base" in results:
                each = [x["rps"] / b["rps"] for x, b in zip(results[s]["rounds"]["gw_c32"],
                                                              results[s + "@base"]["rounds"]["gw_c32"])]
                print(f"{s} vs {s}@base: throughput ratio c=32 {per_round(s, s + '@base', 'rps'):.2f} "
                      f"(per round: {', '.join(f'{v:.2f}' for v in each)}), added p50 c=1 "
                      f"{added_diff(s, s + '@base'):+.3f} ms, CPU per request (base/this) "
                      f"{per_round(s, s + '@base', 'cpu_us', inverse=True):.2f}")
    for s in results:
        if "accounting-off" in results and s in ("passthrough", "redis-postgres"):
            print(f"{s} (limits + accounting on) / accounting-off, medians of per-round ratios: throughput "
                  f"{per_round(s, 'accounting-off', 'rps'):.2f}, CPU per request (off/on) "
                  f"{per_round(s, 'accounting-off', 'cpu_us', inverse=True):.2f}, added p50 "
                  f"{added_diff(s, 'accounting-off'):+.3f} ms")
            each = [x["rps"] / b["rps"] for x, b in zip(results[s]["rounds"]["gw_c32"],
                                                          results["accounting-off"]["rounds"]["gw_c32"])]
            print(f"  per round: {', '.join(f'{v:.2f}' for v in each)}")
        if s in AGENT_PAIRS and AGENT_PAIRS[s] in results:
            cpu = statistics.median(x["cpu_us"] - b["cpu_us"] for x, b in
                                    zip(results[s]["rounds"]["gw_c32"], results[AGENT_PAIRS[s]]["rounds"]["gw_c32"]))
            print(f"{s} vs {AGENT_PAIRS[s]} (translation vs pass-through): added p50 "
                  f"{added_diff(s, AGENT_PAIRS[s]):+.3f} ms, throughput ratio {per_round(s, AGENT_PAIRS[s], 'rps'):.2f}, "
                  f"CPU per request {cpu:+.0f} us")
            each = [(g["p50_ms"] - d["p50_ms"]) - (gb["p50_ms"] - db["p50_ms"]) for g, d, gb, db in zip(
                results[s]["rounds"]["gw_c1"], results[s]["rounds"]["direct_c1"],
                results[AGENT_PAIRS[s]]["rounds"]["gw_c1"], results[AGENT_PAIRS[s]]["rounds"]["direct_c1"])]
            print(f"  added p50 per round (ms): {', '.join(f'{v:+.3f}' for v in each)}")
        if s == "litellm" and "passthrough" in results:
            each = [x["rps"] / b["rps"] for x, b in zip(results["passthrough"]["rounds"]["gw_c32"],
                                                          results["litellm"]["rounds"]["gw_c32"])]
            print(f"passthrough vs litellm ({litellm_version(Path(a.litellm))}): throughput ratio c=32 "
                  f"{per_round('passthrough', 'litellm', 'rps'):.1f}x (per round: {', '.join(f'{v:.1f}' for v in each)}), "
                  f"added p50 c=1 {added_diff('passthrough', 'litellm'):+.3f} ms")
        if s == "anthropic" and "passthrough" in results:
            print(f"anthropic vs passthrough: added p50 {added_diff(s, 'passthrough'):+.3f} ms, "
                  f"throughput ratio {per_round(s, 'passthrough', 'rps'):.2f}")


def git_head(root: Path) -> str:
    r = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return r.stdout.strip()[:80] or "not a git checkout"


def platform_line() -> str:
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, Python {sys.version.split()[0]}"


if __name__ == "__main__":
    main()
