"""Durations written the way admins write them: 30d, 12h, 1y."""
from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdwy]|mo)?\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400, "y": 365 * 86400}


def parse_duration(text: str | int | float | None) -> float | None:
    """"365d", "12h", "30m", "1y", "1mo" or seconds -> seconds; None, "", "never" -> None."""
    if text is None or text == "" or text == "never":
        return None
    if isinstance(text, (int, float)):
        return float(text)
    m = _DURATION.match(str(text).lower())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30d, 12h, 1y)")
    return float(m.group(1)) * _UNIT_S[m.group(2) or "s"]
