"""What issue 14's checks add to one request, measured side by side in one process (timeit, best of
several rounds): the request parser with and without the field checks, the usage check, the worst-case
cost, and an in-process admission with and without a budget reservation. Whole-gateway figures are in
scripts/bench_gateway / bench_instructions; this isolates the new steps, whose sum is to be set against
the gateway's CPU per request there.

    python scripts/bench_integrity.py
"""
from __future__ import annotations

import asyncio
import sys
import timeit
from pathlib import Path
from types import SimpleNamespace

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.asgi import HTTPError  # noqa: E402
from router.accounting.cost import worst_cost  # noqa: E402
from router.accounting.usage import valid_usage  # noqa: E402
from router.catalog import LimitsConf, LimitSet, load_catalog  # noqa: E402
from router.limits.memory import MemoryLimiter  # noqa: E402
from router.limits.policy import Policy  # noqa: E402
from router.pipeline import parse_object  # noqa: E402
from router.store.base import KeyRecord  # noqa: E402

BODY = (b'{"model":"openai/gpt-4o","messages":[{"role":"user","content":"Hello, how are you today?"}],'
        b'"max_tokens":64,"stream":false,"stop":["\\n\\n"]}')
USAGE = {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52,
         "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}}


def parse_before(raw: bytes) -> dict:
    """parse_object as it was before the field checks."""
    if not raw:
        raise HTTPError(400, "Request body is empty; expected a JSON object.")
    body = orjson.loads(raw)
    if type(body) is not dict:
        raise HTTPError(400, "Request body must be a JSON object.")
    model = body.get("model")
    if not model or type(model) is not str:
        raise HTTPError(400, "Missing required parameter: 'model'.")
    return body


def best(fn, n: int = 20000, rounds: int = 7) -> float:
    """Microseconds per call, the best round."""
    return min(timeit.repeat(fn, number=n, repeat=rounds)) / n * 1e6


def main() -> None:
    cat = load_catalog(ROOT / "models.yaml")
    route = cat.resolve("openai/gpt-4o")
    body = orjson.loads(BODY)
    rows = []
    a, b = best(lambda: parse_before(BODY)), best(lambda: parse_object(BODY))
    rows.append(("parse a chat request", a, b))
    rows.append(("usage check (valid_usage)", 0.0, best(lambda: valid_usage({**USAGE}, "openai (openai/gpt-4o)"))
                 - best(lambda: {**USAGE})))
    rows.append(("worst-case cost", 0.0, best(lambda: worst_cost(route.model, body, 30))))

    key = KeyRecord(id="k", key_hash="h", key_hint="sk-...", user_id="u@lbl.gov", max_budget=1e6)
    lim = MemoryLimiter(Policy(LimitsConf(user=LimitSet(budget=1e6))), None)

    async def load() -> None:
        from router.limits.memory import _Plan  # noqa: F401
        plan = lim._plan(key, route)
        for st in (plan.key_scope, plan.user_scope):
            st.spend = [0.0, None, None]
        plan.loaded()
    asyncio.run(load())

    def admit(reserve: float):
        c = SimpleNamespace(key=key, route=route, prompt_estimate=30, reserve=reserve, usage=USAGE, cost=1e-5)
        return lambda: lim.admit_now(c).finish(c)
    rows.append(("admit + finish, budget checked", best(admit(0.0)), best(admit(0.17))))

    print("\n| step | before (us) | after (us) | added (us) |\n|---|---|---|---|")
    total = 0.0
    for name, x, y in rows:
        total += y - x
        print(f"| {name} | {x:.2f} | {y:.2f} | {y - x:+.2f} |")
    print(f"| **sum added per request** | | | **{total:+.2f}** |")


if __name__ == "__main__":
    main()
