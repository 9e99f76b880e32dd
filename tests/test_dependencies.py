"""What the gateway and the node import is what `pip install .` (plus the cpu extra for the CPU
engines) installs. The test environment has every extra, so a module imported by router/ but
declared only under `dev` passes every other test and breaks `scripts/serve` on a fresh machine:
this reads the imports and checks them against pyproject.toml instead."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires

from tests.helpers.servers import ROOT

# Imported only where the extra that provides them is installed (guarded, or in engine processes).
EXTRA_ONLY = {"cpu": ("inference/engines/", "inference/weights.py"), "gpu": ("inference/engines/vllm.py",)}


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in reqs}


def _installed_with(names: set[str]) -> set[str]:
    """`names` and what pip installs with them (their requirements without extras, transitively)."""
    seen, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        try:
            reqs = requires(n) or []
        except PackageNotFoundError:
            continue
        todo += [r for r in _names([q for q in reqs if "extra ==" not in q])]
    return seen


def _imports(path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


def test_every_third_party_import_is_a_declared_dependency():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    main = _installed_with(_names(meta["dependencies"]))
    extras = {k: _installed_with(_names(v)) for k, v in meta["optional-dependencies"].items() if k in EXTRA_ONLY}
    dists = packages_distributions()
    own = {"common", "router", "inference", "cborg"}
    missing = []
    assert "pydantic" in main and "starlette" in main     # through fastapi
    for pkg in sorted(own):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            allowed = set(main)
            for extra, prefixes in EXTRA_ONLY.items():
                if rel.startswith(prefixes):
                    allowed |= extras[extra]
            for top in _imports(path) - own - set(sys.stdlib_module_names) - {"__future__"}:
                names = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
                if not names & allowed:
                    missing.append(f"{rel}: {top} ({', '.join(sorted(names))})")
    assert not missing, "imported but not a dependency of what imports it:\n" + "\n".join(missing)
