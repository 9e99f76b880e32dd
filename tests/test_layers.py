"""The import contract of docs/architecture.md (pyproject.toml [tool.importlinter]), checked on
every run: the gateway and the inference node never import each other, the base layer `common`
imports neither, only the top layer `cborg` imports the top layer, provider translations do no I/O."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers.servers import ROOT


def test_import_contract_holds():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout
