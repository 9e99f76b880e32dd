"""Pydantic validation errors as one line per bad field, named the way models.yaml spells it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


class ConfigError(Exception):
    """models.yaml is invalid; the message names the file and the bad field."""


def read_yaml_mapping(path: Path, error: type[Exception]) -> dict:
    """A YAML file whose top level is a mapping; `error` (naming the file) otherwise."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a mapping at the top level")
    return raw


def format_validation(e: ValidationError, raw: Any, prefix: str = "") -> str:
    """`profiles.cpu.deployments[1] (llama-cpu).engine: Input should be ...`; entries with a
    `name` are named too, so the admin finds the bad one in a long list."""
    lines = []
    for err in e.errors():
        parts: list[str] = [prefix] if prefix else []
        node = raw
        for p in err.get("loc", ()):
            if isinstance(node, (dict, list)):
                try:
                    node = node[p]
                except (KeyError, IndexError, TypeError):
                    node = None
            else:
                node = None
            if isinstance(p, int):
                parts[-1:] = [f"{parts[-1]}[{p}]" if parts else f"[{p}]"]
                if isinstance(node, dict) and "name" in node:
                    parts[-1] += f" ({node['name']})"
            else:
                parts.append(str(p))
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"{'.'.join(parts) or '(top level)'}: {msg}")
    return "; ".join(lines)
