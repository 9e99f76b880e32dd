"""CPU time of each stage of the coding agents' calls (router/agents.py), without I/O: what translation adds
over native pass-through, measured where the wall clock of scripts/bench_gateway (which this complements)
is lost in the shared machine's noise.

For each of the four paths of scripts/bench_gateway's agent scenarios (messages-native, messages-openai,
responses-native, responses-anthropic) with the same request and the same static upstream answer:
  parse    the body checked and the model resolved (Inbound.parse, prepare)
  build    the upstream request, serialized (Inbound.build: dialect -> chat -> provider, or pass-through)
  complete the upstream answer read back into the client's shape, serialized (Inbound.complete)
  done     what is kept after the answer (a stored response: handed to router/stored_responses.py)
Means over --n calls, medians over --rounds rounds, the paths taking turns in each round.

With --paired: the whole call instead, through the gateway's ASGI app in this process (no uvicorn: the same
for every path) against nginx answering the static provider responses, at concurrency 1, a translated
call and its pass-through call taking turns request by request, so that the machine's drift falls on
both alike: per round the p50 of each and their difference; the median of the rounds' differences.

    PYTHONPATH=$PWD python scripts/bench_agent_stages.py [--n 5000] [--rounds 5]
    PYTHONPATH=$PWD python scripts/bench_agent_stages.py --paired [--n 2000] [--rounds 9]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_gateway import ANTHROPIC_RESPONSE, OPENAI_RESPONSE, RESPONSES_RESPONSE, bench_catalog  # noqa: E402

_MSG = b'{"model":"%s","messages":[{"role":"user","content":"Hello, how are you today?"}],"max_tokens":64}'
_RESP = b'{"model":"%s","input":"Hello, how are you today?","max_output_tokens":64}'
PATHS = {   # name -> (API, request, upstream answer)
    "messages-native": ("messages", _MSG % b"anthropic/claude-sonnet", ANTHROPIC_RESPONSE),
    "messages-openai": ("messages", _MSG % b"openai/gpt-4o", OPENAI_RESPONSE),
    "responses-native": ("responses", _RESP % b"openai/gpt-4o", RESPONSES_RESPONSE),
    "responses-anthropic": ("responses", _RESP % b"anthropic/claude-sonnet", ANTHROPIC_RESPONSE),
}
PAIRS = {"messages-openai": "messages-native", "responses-anthropic": "responses-native"}
STAGES = ("parse", "build", "complete", "done")


def _run(coro):
    """A coroutine that never suspends (prepare and done without a previous response), run to its end."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    raise RuntimeError("suspended")


class _Call:
    __slots__ = ("served",)


async def paired(n: int, rounds: int) -> None:
    """Translated and pass-through calls in turn, through the app, against nginx (see the module's doc)."""
    from bench_gateway import free_port, start_nginx
    from router.app import create_app
    from router.config import Settings
    from router.key_admin import create_key

    tmp = Path(tempfile.mkdtemp(prefix="cborg-paired-"))
    port = free_port()
    nginx = start_nginx(tmp, port, "0")
    time.sleep(0.3)
    app = create_app(Settings.from_env({
        "CBORG_DATABASE_URL": f"sqlite:///{tmp}/db.sqlite", "CBORG_CONFIG": str(bench_catalog(tmp)),
        "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
        "ANTHROPIC_API_KEY": "sk-ant-bench", "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
        "XAI_API_KEY": "x", "GEMINI_API_KEY": "x", "CBORG_REQUEST_LOGS": "off"}))
    gw = app.state
    await gw.start()
    try:
        secret, rec = await create_key(gw.store, "bench@lbl.gov", fields=dict(
            max_parallel=10_000, rpm=100_000_000, tpm=10_000_000_000, max_budget=1_000_000, budget_period="30d"))
        gw.keys.put(rec)
        auth = [(b"content-type", b"application/json"), (b"authorization", b"Bearer " + secret.encode()),
                (b"anthropic-version", b"2023-06-01")]

        async def one(name: str) -> float:
            api, raw, _ = PATHS[name]
            scope = {"type": "http", "method": "POST", "path": f"/v1/{api}", "query_string": b"",
                     "headers": [*auth, (b"content-length", str(len(raw)).encode())]}
            got: list = []
            sent = False

            async def receive():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": raw, "more_body": False}
                await asyncio.sleep(3600)

            async def send(m):
                if m["type"] == "http.response.start":
                    got.append(m["status"])
                elif not m.get("more_body"):
                    got.append(time.perf_counter_ns())
            t0 = time.perf_counter_ns()
            await app(dict(scope), receive, send)
            if got[0] != 200:
                sys.exit(f"{name}: HTTP {got[0]}")
            return (got[-1] - t0) / 1e6

        for name in PATHS:
            for _ in range(500):
                await one(name)
        print(f"\nadded p50 (ms), in-process, concurrency 1, {n} calls of each a round, in turn; "
              f"Python {sys.version.split()[0]}\n")
        for t, b in PAIRS.items():
            diffs = []
            for _ in range(rounds):
                xs: list[float] = []
                ys: list[float] = []
                for _ in range(n):
                    xs.append(await one(t))
                    ys.append(await one(b))
                diffs.append((statistics.median(xs), statistics.median(ys)))
            each = [x - y for x, y in diffs]
            print(f"{t} - {b}: {statistics.median(each):+.3f} ms (p50s {statistics.median(x for x, _ in diffs):.3f} "
                  f"and {statistics.median(y for _, y in diffs):.3f}; per round: {', '.join(f'{v:+.3f}' for v in each)})")
    finally:
        await gw.stop()
        nginx.terminate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--paired", action="store_true", help="whole calls through the app, in turn (see above)")
    a = ap.parse_args()
    if a.paired:
        import uvloop
        uvloop.install()
        asyncio.run(paired(a.n, a.rounds))
        return
    from router.agents import MessagesCall, ResponsesCall
    from router.app import Gateway
    from router.config import Settings
    from router.providers import adapter
    from router.store.base import KeyRecord

    tmp = Path(tempfile.mkdtemp(prefix="cborg-stages-"))
    gw = Gateway(Settings.from_env({
        "CBORG_DATABASE_URL": f"sqlite:///{tmp}/db.sqlite", "CBORG_CONFIG": str(bench_catalog(tmp)),
        "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "ANTHROPIC_API_KEY": "sk-ant-bench",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9", "XAI_API_KEY": "x", "GEMINI_API_KEY": "x"}))
    key = KeyRecord("key-bench", "-", "sk-...", "bench@lbl.gov")
    headers = {b"x-api-key": b"sk-bench", b"anthropic-version": b"2023-06-01"}
    kinds = {"messages": MessagesCall, "responses": ResponsesCall}
    clock = time.thread_time_ns     # this thread's CPU time: what other processes take from the core is not counted

    def one(api: str, raw: bytes, answer: bytes) -> tuple[int, int, int, int]:
        t0 = clock()
        ib = kinds[api](gw, headers)
        body = ib.parse(raw)
        route = gw.catalog.resolve(body["model"])
        _run(ib.prepare(key, route))
        ep, _ = gw.endpoint_for(route)
        ad = adapter(route.provider.protocol)
        t1 = clock()
        ib.build(ad, ep, route, False)
        t2 = clock()
        ib.complete(ad, route, answer)
        t3 = clock()
        call = _Call()
        call.served = route
        _run(ib.done(call))
        t4 = clock()
        gw.responses._pending.clear()    # (the writer's part, off the request, is not measured here)
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3

    cases = {name: (api, raw, answer.encode()) for name, (api, raw, answer) in PATHS.items()}
    for c in cases.values():
        for _ in range(1000):
            one(*c)
    rounds: dict[str, list[list[float]]] = {name: [] for name in cases}
    for _ in range(a.rounds):
        for name, c in cases.items():
            xs = [one(*c) for _ in range(a.n)]
            rounds[name].append([sum(x[i] for x in xs) / len(xs) / 1e3 for i in range(4)])
    med = {name: [statistics.median(r[i] for r in rs) for i in range(4)] for name, rs in rounds.items()}
    print(f"\nCPU per call (us): means of {a.n} calls, medians of {a.rounds} rounds; Python {sys.version.split()[0]}\n")
    print("| path | " + " | ".join(STAGES) + " | total |")
    print("|---|" + "---|" * (len(STAGES) + 1))
    for name, m in med.items():
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in m) + f" | {sum(m):.1f} |")
    print()
    for t, b in PAIRS.items():
        each = [sum(x) - sum(y) for x, y in zip(rounds[t], rounds[b])]
        print(f"{t} - {b}: {statistics.median(each):+.1f} us a call (per round: "
              f"{', '.join(f'{v:+.1f}' for v in each)})")


if __name__ == "__main__":
    main()
