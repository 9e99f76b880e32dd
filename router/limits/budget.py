"""Budget periods: spend resets to zero when a period ends; periods roll forward from the first."""
from __future__ import annotations

import math


def roll(spend: float, reset_at: float | None, period_s: float | None, now: float) -> tuple[float, float | None]:
    """(spend, reset_at) as of `now`. No period: a lifetime budget that never resets."""
    if period_s is None:
        return spend, None
    if reset_at is None:
        return spend, now + period_s
    if now >= reset_at:
        n = math.floor((now - reset_at) / period_s) + 1
        return 0.0, reset_at + n * period_s
    return spend, reset_at
