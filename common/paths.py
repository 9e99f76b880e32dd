"""Where CBorg keeps things, and which models.yaml profile a process serves: the same answer for
the gateway and the inference node."""
from __future__ import annotations

import os
from pathlib import Path


def cborg_home() -> Path:
    """The embedded database, engine logs and run files: CBORG_HOME, default ~/.cborg."""
    return Path(os.environ.get("CBORG_HOME") or Path.home() / ".cborg")


def cborg_cache() -> Path:
    """Prepared model weights and other re-creatable downloads: CBORG_CACHE, default ~/.cache/cborg."""
    return Path(os.environ.get("CBORG_CACHE") or Path.home() / ".cache" / "cborg")


def chosen_profile(raw: dict, profile: str | None = None) -> str:
    """The profile asked for, else CBORG_PROFILE, else models.yaml's default_profile, else cpu."""
    return profile or os.environ.get("CBORG_PROFILE") or raw.get("default_profile") or "cpu"
