"""The 30-day chart of a user's daily spend by model, laid out here and drawn by the template as an
SVG (no chart library, no script): stacked bars per UTC day, the biggest models in their own
colours and the rest as "other", with the same figures as a table for screen readers."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ...accounting.ledger import DAY_S
from ...store.base import DaySpend

DAYS = 30
# Distinguishable, and at least 3:1 against white (WCAG's non-text contrast); grey is "other".
PALETTE = ("#1d4ed8", "#c2410c", "#15803d", "#7e22ce", "#a16207", "#be123c", "#0f766e")
OTHER = ("other models", "#52525b")
W, H = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 84, 8, 10, 26


@dataclass
class Bar:
    x: float
    y: float
    w: float
    h: float
    color: str
    title: str


@dataclass
class Chart:
    width: int = W
    height: int = H
    bars: list[Bar] = field(default_factory=list)
    ticks: list[tuple[float, str]] = field(default_factory=list)      # (y, label)
    labels: list[tuple[float, str]] = field(default_factory=list)     # (x, date)
    legend: list[tuple[str, str, float]] = field(default_factory=list)  # (model, colour, 30-day cost)
    table: list[tuple[str, list[float]]] = field(default_factory=list)  # (date, cost per legend entry)
    total: float = 0.0
    baseline: float = H - BOTTOM
    left: float = LEFT


def today() -> int:
    return int(datetime.now(timezone.utc).timestamp() // DAY_S)


def day_label(day: int) -> str:
    return datetime.fromtimestamp(day * DAY_S, timezone.utc).strftime("%b %d")


def nice_ceiling(v: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least v."""
    if v <= 0:
        return 1.0
    p = 10 ** math.floor(math.log10(v))
    return next(m * p for m in (1, 2, 2.5, 5, 10) if m * p >= v * (1 - 1e-12))


def build(rows: list[DaySpend], last_day: int, money) -> Chart:
    first = last_day - DAYS + 1
    by_model: dict[str, float] = {}
    for r in rows:
        if first <= r.day <= last_day:
            by_model[r.model] = by_model.get(r.model, 0.0) + r.cost
    ranked = sorted((m for m, c in by_model.items() if c > 0), key=lambda m: -by_model[m])
    top = ranked[:len(PALETTE)]
    colour = {m: PALETTE[i] for i, m in enumerate(top)}
    legend = [(m, colour[m], by_model[m]) for m in top]
    if len(ranked) > len(top):
        legend.append((OTHER[0], OTHER[1], sum(by_model[m] for m in ranked[len(top):])))
    slot = {name: i for i, (name, _, _) in enumerate(legend)}
    grid = [[0.0] * len(legend) for _ in range(DAYS)]
    for r in rows:
        if first <= r.day <= last_day and r.cost > 0:
            grid[r.day - first][slot.get(r.model, len(legend) - 1)] += r.cost
    chart = Chart(legend=legend, total=sum(by_model.values()))
    top_v = nice_ceiling(max((sum(d) for d in grid), default=0.0))
    plot_h = H - TOP - BOTTOM
    step = (W - LEFT - RIGHT) / DAYS
    for i in range(5):
        v = top_v * i / 4
        chart.ticks.append((chart.baseline - plot_h * i / 4, money(v)))
    for d, costs in enumerate(grid):
        x = LEFT + d * step
        if d % 5 == 4 or d == DAYS - 1:
            chart.labels.append((x + step / 2, day_label(first + d)))
        y = chart.baseline
        for (name, col, _), c in zip(legend, costs):
            if c <= 0:
                continue
            h = max(plot_h * c / top_v, 1.0)
            y -= h
            chart.bars.append(Bar(round(x + 2, 1), round(y, 1), round(step - 4, 1), round(h, 1), col,
                                  f"{day_label(first + d)}: {name} {money(c)}"))
        if any(costs):
            chart.table.append((day_label(first + d), costs))
    return chart
