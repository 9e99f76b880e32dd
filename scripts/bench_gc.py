"""What a full garbage collection costs a started gateway, with and without `freeze_start_up`
(router/app.py): the pause every request in flight waits through when the collector runs a full pass.

    PYTHONPATH=$PWD python scripts/bench_gc.py [--keys 20000] [--rounds 7]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    from router.app import create_app
    from router.config import Settings
    from router.key_admin import create_key

    tmp = tempfile.mkdtemp()
    os.environ["CBORG_HOME"] = tmp
    settings = Settings.from_env()
    settings.database_url = f"sqlite:///{tmp}/bench.db"
    app = create_app(settings)
    gw = app.state
    await gw.store.init()
    for i in range(a.keys):
        await create_key(gw.store, f"user{i % 5000}@lab.gov", fields={"key_alias": f"k{i}"})
    await gw.start()

    def full_pass_ms() -> float:
        samples = []
        for _ in range(a.rounds):
            t = time.perf_counter()
            gc.collect()
            samples.append((time.perf_counter() - t) * 1000)
        return statistics.median(samples)

    tracked = len(gc.get_objects())
    before = full_pass_ms()
    gc.freeze()
    after = full_pass_ms()
    print(f"{a.keys} keys, {tracked:,} objects tracked after start: full collection {before:.1f} ms, "
          f"after gc.freeze() {after:.2f} ms (median of {a.rounds})")
    gc.unfreeze()
    await gw.stop()


if __name__ == "__main__":
    asyncio.run(main())
