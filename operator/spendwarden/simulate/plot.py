"""Cumulative cost over time, one line per candidate.

FILE.svg is written by this module alone (no dependency); FILE.png needs matplotlib, the optional
extra `spendwarden[plot]`. Money is converted to float only here, for drawing.
"""
from __future__ import annotations

import os
from datetime import UTC, datetime
from decimal import Decimal
from xml.sax.saxutils import escape

Series = list[tuple[datetime, Decimal]]
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
PNG_EXTRA = "pip install 'spendwarden[plot]'  (matplotlib)"


class PlotError(Exception):
    pass


def plot(path: str, series: dict[str, Series], currency: str) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".svg":
        text = svg(series, currency)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    elif ext == ".png":
        png(path, series, currency)
    else:
        raise PlotError(f"--plot {path}: the file must end in .png (matplotlib) or .svg (built in)")


def png(path: str, series: dict[str, Series], currency: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError(f"--plot {path}: PNG output needs matplotlib, which is not installed: {PNG_EXTRA}; "
                        f"or write an SVG (--plot {os.path.splitext(path)[0]}.svg) with no extra") from None
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    for i, (name, points) in enumerate(series.items()):
        if points:
            ax.step([t for t, _ in points], [float(c) for _, c in points], where="post", label=name,
                    color=COLORS[i % len(COLORS)])
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel(f"cumulative cost ({currency})")
    ax.set_title("Simulated spend per candidate")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _nice_step(span: float, ticks: int = 5) -> float:
    """A round grid step (1, 2 or 5 times a power of ten) giving about `ticks` lines over `span`."""
    raw = span / ticks if span > 0 else 1.0
    mag = 1.0
    while mag * 10 <= raw:
        mag *= 10
    while mag > raw:
        mag /= 10
    for m in (1, 2, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def svg(series: dict[str, Series], currency: str, width: int = 900, height: int = 500) -> str:
    left, right, top, bottom = 80, 20, 40, 60
    pw, ph = width - left - right, height - top - bottom
    points = [p for s in series.values() for p in s]
    t0 = min((t for t, _ in points), default=datetime.fromtimestamp(0, UTC)).timestamp()
    t1 = max((t for t, _ in points), default=datetime.fromtimestamp(1, UTC)).timestamp()
    t1 = t1 if t1 > t0 else t0 + 1
    ymax = max((float(c) for _, c in points), default=1.0) or 1.0
    step = _nice_step(ymax)
    ytop = step * -(-ymax // step)

    def x(t: float) -> float:
        return left + (t - t0) / (t1 - t0) * pw

    def y(v: float) -> float:
        return top + ph - v / ytop * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">Simulated spend per candidate</text>']
    v = 0.0
    while v <= ytop + step / 2:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
        v += step
    for i in range(6):
        t = t0 + (t1 - t0) * i / 5
        label = datetime.fromtimestamp(t, UTC).strftime("%m-%d %H:%M")
        out.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top + ph}" y2="{top + ph + 5}" stroke="#333"/>')
        out.append(f'<text x="{x(t):.1f}" y="{top + ph + 20}" text-anchor="middle">{label}</text>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="#333"/>')
    out.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#333"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 15}" text-anchor="middle">time (UTC)</text>')
    out.append(f'<text x="18" y="{top + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 18 {top + ph / 2})">cumulative cost ({escape(currency)})</text>')
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        if pts:
            # A step line: cost jumps at each request.
            coords = [f"{x(pts[0][0].timestamp()):.1f},{y(0):.1f}"]
            prev = 0.0
            for at, c in pts:
                xt = x(at.timestamp())
                coords.append(f"{xt:.1f},{y(prev):.1f}")
                prev = float(c)
                coords.append(f"{xt:.1f},{y(prev):.1f}")
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(coords)}"/>')
        ly = top + 10 + 18 * i
        out.append(f'<rect x="{left + 12}" y="{ly - 9}" width="14" height="4" fill="{color}"/>')
        out.append(f'<text x="{left + 32}" y="{ly - 3}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
