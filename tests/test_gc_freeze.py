"""A gateway started by the CLI takes its start-up objects out of the garbage collector's full
passes (router/app.py freeze_start_up; scripts/bench_gc.py: 146 ms a pass at 20,000 keys, 0 after);
one made for in-process use does not (it would leak what it froze)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers.servers import ROOT

CODE = """
import asyncio, gc
from router.app import create_app, freeze_start_up
app = create_app()
if {freeze}:
    freeze_start_up(app)
async def main():
    await app.state.start()
    print(gc.get_freeze_count())
    await app.state.stop()
asyncio.run(main())
"""


@pytest.mark.parametrize("freeze", [True, False])
def test_start_up_objects_frozen_only_where_asked(tmp_path, freeze):
    env = {**os.environ, "CBORG_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("CBORG_DATABASE_URL", None)
    env.pop("CBORG_REDIS_URL", None)
    out = subprocess.run([sys.executable, "-c", CODE.format(freeze=freeze)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    frozen = int(out.stdout.strip().splitlines()[-1])
    assert (frozen > 10_000) if freeze else frozen == 0
