"""Line plots drawn with Pillow (no plotting dependency): `plot_curves` (panels of y against one x), `plot_run`
(a training run's `log.jsonl` -> `curves.png`, `sundae plot`), and the axis ticks they share: round values
(`nice_ticks`) labelled with as many significant digits as it takes to tell them apart (`tick_labels`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from sundae.io import atomic_write, log

BLUE = (31, 119, 180)


def tick_labels(values: Sequence[float]) -> list[str]:
    """Plain labels for tick `values` that keep distinct values distinct: each with the fewest decimals that
    give it back to within a thousandth of the smallest gap between the values (162.15, 162.2, 162.25 stay
    "162.15", "162.2", "162.25", never "162.2" twice; 1000 is "1000", not "1e+03"); %g with enough
    significant digits beyond 1e6 or below 1e-4 in magnitude."""
    distinct = sorted(set(values))
    gaps = [b - a for a, b in zip(distinct, distinct[1:])]
    size = max((abs(v) for v in values), default=0.0)
    if 1e-4 <= size < 1e6:
        tol = min(gaps) * 1e-3 if gaps else size * 1e-9
        labels = [next((f"{v:.{p}f}" for p in range(13) if abs(float(f"{v:.{p}f}") - v) <= tol), f"{v:.12f}")
                  for v in values]
        if len(set(labels)) == len(distinct):
            return labels
    for digits in range(3, 18):
        labels = [f"{v:.{digits}g}" for v in values]
        if len(set(labels)) == len(distinct):
            return labels
    return labels


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round values (1, 2, 2.5 or 5 times a power of ten apart) inside [lo, hi], lo < hi: with the largest such
    step near (hi - lo) / (count - 1) that still gives at least 3; rounded to the step's decimals (0.3, not
    0.30000000000000004)."""
    power = 10.0 ** math.floor(math.log10((hi - lo) / max(count - 1, 1)))
    steps = [m * power for m in (10, 5, 2.5, 2, 1)] + [m * power / 10 for m in (5, 2.5, 2, 1)]
    for step in steps:
        decimals = max(0, -math.floor(math.log10(step)) + 1)
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        ticks = [round(i * step, decimals) for i in range(first, last + 1)]
        if len(ticks) >= 3:
            return ticks
    return [lo, hi]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_curves(xs: Sequence[float], series: dict[str, Sequence[float | None]], xlabel: str, path: str | Path,
                title: str = "", xlog: bool | None = None) -> dict[str, list[str]]:
    """One panel per entry of `series` (its values against `xs`), stacked, each with its own y axis (the
    quantities have different units) and round ticks labelled so that no two read the same (`tick_labels`).
    `xlog`: a log2 x axis (None: when every x > 0 and there are at most 12 of them, as in a sweep over T,
    each then labelled). Missing (None) or non-finite values are left out. Written atomically as PNG.
    Returns the y tick labels drawn in each panel (and "x": the x labels)."""
    panel_h, width, left, right, top = 150, 640, 90, 20, 30
    height = top + panel_h * len(series) + 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), title, fill="black")
    xlog = all(x > 0 for x in xs) and len(xs) <= 12 if xlog is None else xlog
    fx = [math.log2(x) if xlog else float(x) for x in xs]
    lo_x, hi_x = min(fx), (max(fx) if max(fx) > min(fx) else min(fx) + 1)

    def px(v: float) -> float:
        return left + 10 + (v - lo_x) / (hi_x - lo_x) * (width - left - right - 20)

    drawn: dict[str, list[str]] = {}
    for i, (name, ys) in enumerate(series.items()):
        y0, y1 = top + i * panel_h + 18, top + (i + 1) * panel_h - 12  # plot area of this panel
        draw.rectangle((left, y0, width - right, y1), outline="black")
        draw.text((left + 4, y0 - 15), name, fill="black")
        finite = [y for y in ys if _finite(y)]
        if not finite:
            drawn[name] = []
            continue
        lo, hi = min(finite), max(finite)
        pad = (hi - lo) * 0.1 if hi > lo else max(abs(hi) * 0.1, 1e-6)
        lo, hi = lo - pad, hi + pad

        def py(y: float) -> float:
            return y1 - 6 - (y - lo) / (hi - lo) * (y1 - y0 - 12)

        ticks = nice_ticks(lo, hi, 4)
        drawn[name] = tick_labels(ticks)
        for t, label in zip(ticks, drawn[name]):
            draw.line((left - 4, py(t), left, py(t)), fill="black")
            draw.line((left + 1, py(t), width - right - 1, py(t)), fill=(230, 230, 230))
            draw.text((4, py(t) - 6), label, fill="black")
        points = [(px(x), py(y)) for x, y in zip(fx, ys) if _finite(y)]
        if len(points) > 1:
            draw.line(points, fill=BLUE, width=2)
        if len(points) <= 50:
            for x, y in points:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=BLUE)
    bottom = top + panel_h * len(series) - 12
    integers = all(float(x).is_integer() for x in xs)  # steps: no tick at step 3.2
    xticks = list(zip(fx, xs)) if xlog else [(t, t) for t in nice_ticks(lo_x, hi_x, 6) if t == int(t) or not integers]
    drawn["x"] = tick_labels([label for _, label in xticks])
    for (x, _), label in zip(xticks, drawn["x"]):
        draw.line((px(x), bottom, px(x), bottom + 5), fill="black")
        draw.text((px(x) - 8, bottom + 8), label, fill="black")
    draw.text((width // 2 - 60, height - 18), xlabel + (" (log scale)" if xlog else ""), fill="black")
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return drawn


def read_log(path: str | Path) -> list[dict]:
    """The records of a run's `log.jsonl` (lines that are not JSON objects, such as a line a crash cut short,
    are skipped). Raises FileNotFoundError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: `sundae plot` takes the run folder of `sundae train` or "
                                f"`sundae train-vqgan`")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw every number a training run logged (`RUN/log.jsonl`: losses, per-unroll-step losses, lr,
    tokens/s or images/s, PSNR, codebook usage, ...) against the step, one panel per quantity in the order
    the log first names them, to `out` (default `RUN/curves.png`), atomically. Returns the PNG's path.
    A value that is NaN or infinite (a diverged loss) cannot be drawn: a warning names the quantity, how many
    records hold such values and the first step. `run` may also be the log.jsonl file itself.
    Raises FileNotFoundError when RUN has no log.jsonl, ValueError when it holds no logged step yet."""
    run = Path(run)
    if run.name == "log.jsonl" and run.is_file():
        run = run.parent
    records = [r for r in read_log(run / "log.jsonl") if _finite(r.get("step"))]
    for key in dict.fromkeys(k for r in records for k in r):
        bad = [r["step"] for r in records if isinstance(r.get(key), float) and not math.isfinite(r[key])]
        if bad:
            log.warning(f"{run / 'log.jsonl'}: {key} is NaN or infinite in {len(bad)} record(s), first at step "
                        f"{bad[0]}: not drawn (the run diverged there)")
    keys = list(dict.fromkeys(k for r in records for k, v in r.items() if k != "step" and _finite(v)))
    records = [r for r in records if any(_finite(r.get(k)) for k in keys)]
    if not records:
        raise ValueError(f"{run / 'log.jsonl'} holds no logged step yet (a run logs every log_every steps)")
    out = Path(out) if out is not None else run / "curves.png"
    series = {k: [r.get(k) if _finite(r.get(k)) else None for r in records] for k in keys}
    plot_curves([r["step"] for r in records], series, "step", out, title=f"{run.resolve().name}: log.jsonl",
                xlog=False)
    return out
