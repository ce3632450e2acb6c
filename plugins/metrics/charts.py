"""Per-minute counters in a ring, and the console's charts drawn from them as inline SVG.

No JavaScript and nothing fetched: each chart is an ``<svg>`` element written by the server,
with a ``<title>`` on every bar (the browser shows it as a tooltip) and a plain-text legend.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

RING_MINUTES: Final = 360
"""Six hours of per-minute counters (a few kilobytes)."""


class MinuteRing:
    """Counters per minute for the last ``minutes`` minutes, by series name.

    Each slot holds one minute (``int(time // 60)``); a slot is reused, and emptied, when its
    minute comes round again, so memory stays bounded however long the server runs.
    """

    def __init__(self, minutes: int = RING_MINUTES) -> None:
        self.minutes = minutes
        self.slots: list[tuple[int, dict[str, int]]] = [(-1, {}) for _ in range(minutes)]

    def add(self, series: str, n: int = 1, now: float | None = None) -> None:
        minute = int((time.time() if now is None else now) // 60)
        index = minute % self.minutes
        stamp, counts = self.slots[index]
        if stamp != minute:
            counts = {}
            self.slots[index] = (minute, counts)
        counts[series] = counts.get(series, 0) + n

    def window(self, minutes: int, now: float | None = None) -> tuple[int, list[dict[str, int]]]:
        """(the first minute, the counters of each minute from it to the current one)."""
        minutes = max(1, min(minutes, self.minutes))
        last = int((time.time() if now is None else now) // 60)
        first = last - minutes + 1
        out = []
        for minute in range(first, last + 1):
            stamp, counts = self.slots[minute % self.minutes]
            out.append(dict(counts) if stamp == minute else {})
        return first, out


@dataclass(frozen=True, slots=True)
class Series:
    key: str
    label: str
    color: str


def _nice_ceiling(value: int) -> int:
    """1, 2, 5, 10, 20, 50 ... at or above ``value`` (the top of the y axis)."""
    if value <= 1:
        return 1
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def _clock(minute: int) -> str:
    return time.strftime("%H:%M", time.localtime(minute * 60))


WIDTH: Final = 720
HEIGHT: Final = 170
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 8, 10, 22


def stacked_bars(title: str, first: int, counts: Sequence[dict[str, int]],
                 series: Sequence[Series]) -> str:
    """An SVG chart of ``counts`` (one dict per minute from minute ``first``), one stacked
    bar per minute, the series in the order given; with its title and a legend (HTML)."""
    e = html.escape
    totals = [sum(c.get(s.key, 0) for s in series) for c in counts]
    top = _nice_ceiling(max(totals, default=0))
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    step = plot_w / max(1, len(counts))
    bar = max(1.0, step * 0.8)
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{e(title)}" xmlns="http://www.w3.org/2000/svg">',
             f"<title>{e(title)}</title>"]
    for value in (0.0, top / 2, float(top)) if top > 1 else (0.0, 1.0):  # 0, half, top
        y = _TOP + plot_h - plot_h * value / top
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y:.1f}" '
                     f'y2="{y:.1f}"/><text class="axis" x="{_LEFT - 6}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{value:g}</text>')
    label_every = max(1, len(counts) // 6)
    label_every = next((n for n in (5, 10, 15, 30, 60, 120) if n >= label_every), label_every)
    for i, minute_counts in enumerate(counts):
        minute = first + i
        x = _LEFT + i * step + (step - bar) / 2
        if minute % label_every == 0:
            parts.append(f'<text class="axis" x="{x + bar / 2:.1f}" y="{HEIGHT - 6}" '
                         f'text-anchor="middle">{_clock(minute)}</text>')
        if not totals[i]:
            continue
        y = _TOP + plot_h
        tip = ", ".join(f"{s.label} {minute_counts[s.key]}" for s in series
                        if minute_counts.get(s.key))
        parts.append(f'<g class="bar"><title>{_clock(minute)}: {e(tip)}</title>')
        for s in series:
            n = minute_counts.get(s.key, 0)
            if not n:
                continue
            h = plot_h * n / top
            y -= h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" '
                         f'height="{max(h, 0.5):.1f}" fill="{e(s.color)}" '
                         f'data-series="{e(s.key)}" data-count="{n}"/>')
        parts.append("</g>")
    parts.append("</svg>")
    total_by = {s.key: sum(c.get(s.key, 0) for c in counts) for s in series}
    legend = "".join(
        f'<li><span class="swatch" style="background:{e(s.color)}"></span>{e(s.label)}: '
        f"{total_by[s.key]}</li>" for s in series)
    return (f'<figure><figcaption>{e(title)}</figcaption>{"".join(parts)}'
            f'<ul class="legend">{legend}</ul></figure>')


_CLASS_COLORS: Final = {
    "2": ("#2e7d32", "#66bb6a", "#1b5e20", "#a5d6a7"),
    "3": ("#0277bd", "#4fc3f7"),
    "4": ("#ef6c00", "#ffb300", "#bf360c", "#ffd54f", "#8d6e63"),
    "5": ("#c62828", "#ad1457", "#6a1b9a", "#e57373", "#4e342e", "#f06292"),
}


def code_series(codes: Sequence[str], prefix: str = "") -> list[Series]:
    """A series per reply code (key ``prefix + code``), coloured by class: 2xx green, 4xx
    amber, 5xx red, each code of a class a shade of its own."""
    out = []
    used: dict[str, int] = {}
    for code in sorted(codes):
        palette = _CLASS_COLORS.get(code[:1], ("#757575",))
        n = used.get(code[:1], 0)
        used[code[:1]] = n + 1
        out.append(Series(prefix + code, code, palette[n % len(palette)]))
    return out
