"""Line plots drawn with Pillow (no plotting library needed): panels of x-y series on log or linear axes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from sundae.io import atomic_write
from sundae.plots import tick_labels  # as many digits as it takes to tell the ticks apart

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


@dataclass
class Panel:
    """One plot: `series` maps a name to its (x, y) points; `hlines` maps a name to a horizontal line's y."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[float, float]]]
    xlog: bool = True
    hlines: dict[str, float] = field(default_factory=dict)


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        for mantissas in ((1, 2, 5), range(1, 10)):  # all nine per decade when the range is narrow
            ticks = [m * 10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                     for m in mantissas]
            ticks = [t for t in ticks if lo <= t <= hi]
            if len(ticks) >= 3:
                return ticks
        return [lo, hi]
    step = 10.0 ** math.floor(math.log10(max(hi - lo, 1e-12)))
    while (hi - lo) / step > 8:
        step *= 2
    while (hi - lo) / step < 4:
        step /= 2
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], panel: Panel,
               colours: dict[str, tuple[int, int, int]]) -> None:
    """Draw `panel` into the pixel rectangle `box` = (left, top, right, bottom)."""
    left, top, right, bottom = box
    x0, y0, x1, y1 = left + 60, top + 30, right - 15, bottom - 45
    points = [p for s in panel.series.values() for p in s if p[0] > 0 or not panel.xlog]
    if not points:
        return
    xs = [p[0] for p in points]
    ys = [p[1] for p in points] + list(panel.hlines.values())
    xlo, xhi = min(xs), max(xs)
    if xlo == xhi:
        xlo, xhi = (xlo / 2, xhi * 2) if panel.xlog else (xlo - 1, xhi + 1)
    ylo, yhi = 0.0, max(ys) * 1.08 if max(ys) > 0 else 1.0
    fx = (lambda v: math.log10(v)) if panel.xlog else (lambda v: v)

    def px(x: float, y: float) -> tuple[float, float]:
        return (x0 + (fx(x) - fx(xlo)) / (fx(xhi) - fx(xlo)) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0))

    draw.text((left + 60, top + 8), panel.title, fill="black")
    draw.rectangle((x0, y0, x1, y1), outline="black")
    xticks, yticks = _ticks(xlo, xhi, panel.xlog), _ticks(ylo, yhi, False)
    for t, label in zip(xticks, tick_labels(xticks)):
        x, _ = px(t, ylo)
        draw.line((x, y1, x, y1 + 4), fill="black")
        draw.text((x - 8, y1 + 6), label, fill="black")
    for t, label in zip(yticks, tick_labels(yticks)):
        _, y = px(xlo, t)
        draw.line((x0 - 4, y, x0, y), fill="black")
        draw.line((x0, y, x1, y), fill=(230, 230, 230))
        draw.text((left + 4, y - 6), label, fill="black")
    draw.text(((x0 + x1) // 2 - 40, y1 + 24), panel.xlabel, fill="black")
    draw.text((left + 4, top + 16), panel.ylabel, fill="black")
    for name, y in panel.hlines.items():
        _, yy = px(xlo, y)
        for x in range(int(x0), int(x1), 10):  # dashed
            draw.line((x, yy, min(x + 5, x1), yy), fill=colours[name])
    for name, pts in panel.series.items():
        pts = sorted(p for p in pts if p[0] > 0 or not panel.xlog)
        xy = [px(*p) for p in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colours[name], width=2)
        for x, y in xy:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colours[name])


def save_panels(panels: list[Panel], path: str | Path, columns: int = 2, size: tuple[int, int] = (460, 340)) -> None:
    """Draw the panels on a grid (`columns` wide) with one shared legend below, and write a PNG atomically."""
    names = list(dict.fromkeys([n for p in panels for n in p.series] + [n for p in panels for n in p.hlines]))
    colours = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    rows = -(-len(panels) // columns)
    legend_h = 18 * (-(-len(names) // 3)) + 10
    image = Image.new("RGB", (columns * size[0], rows * size[1] + legend_h), "white")
    draw = ImageDraw.Draw(image)
    for i, panel in enumerate(panels):
        c, r = i % columns, i // columns
        draw_panel(draw, (c * size[0], r * size[1], (c + 1) * size[0], (r + 1) * size[1]), panel, colours)
    for i, name in enumerate(names):
        x, y = 20 + (i % 3) * (columns * size[0] // 3), rows * size[1] + 5 + 18 * (i // 3)
        dashed = any(name in p.hlines for p in panels)
        draw.line((x, y + 6, x + 20, y + 6), fill=colours[name], width=1 if dashed else 3)
        draw.text((x + 26, y), name + (" (dashed)" if dashed else ""), fill="black")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
