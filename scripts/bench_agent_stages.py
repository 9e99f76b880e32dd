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

    PYTHONPATH=$PWD python scripts/bench_agent_stages.py [--n 5000] [--rounds 5]
"""
from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
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
    clock = time.perf_counter_ns

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
