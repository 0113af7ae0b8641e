#!/usr/bin/env python3
"""Latency-vs-rate plot from a `tollgate-gate --json` report, as a dependency-free SVG.

Usage: bench/plot.py REPORT.json OUT.svg [--scenario chat] [--quantile p99_us]

One line per target (direct, tollgate, nginx, haproxy): the median over repeats of the chosen latency quantile
at each open-loop rate of the scenario. Log-scale latency axis.
"""

import json
import math
import sys

COLORS = {"direct": "#555555", "tollgate": "#d62728", "nginx": "#2ca02c", "haproxy": "#1f77b4"}


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    report_path, out_path = argv[1], argv[2]
    scenario = "chat"
    quantile = "p99_us"
    if "--scenario" in argv:
        scenario = argv[argv.index("--scenario") + 1]
    if "--quantile" in argv:
        quantile = argv[argv.index("--quantile") + 1]
    report = json.load(open(report_path))
    rows = [s for s in report["summaries"] if s["scenario"] == scenario]
    if not rows:
        print(f"no summaries for scenario {scenario!r}", file=sys.stderr)
        return 1
    series = {}
    for r in rows:
        series.setdefault(r["target"], []).append((r["rate"], r[quantile]))
    for pts in series.values():
        pts.sort()
    rates = sorted({r["rate"] for r in rows})
    values = [v for pts in series.values() for _, v in pts if v and v > 0]
    lo, hi = min(values), max(values)
    lo = 10 ** math.floor(math.log10(lo))
    hi = 10 ** math.ceil(math.log10(hi))

    w, h, ml, mr, mt, mb = 720, 420, 70, 140, 40, 50
    pw, ph = w - ml - mr, h - mt - mb

    def x(rate):
        if len(rates) == 1:
            return ml + pw / 2
        return ml + pw * (rate - rates[0]) / (rates[-1] - rates[0])

    def y(v):
        return mt + ph * (1 - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{ml}" y="20" font-size="14">{scenario}: {quantile.replace("_us", "")} latency vs open-loop rate '
        f'({report.get("connections", "?")} connections, median of {report.get("repeats", "?")} repeats)</text>',
        f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" stroke="black"/>',
        f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + ph}" stroke="black"/>',
    ]
    decade = lo
    while decade <= hi:
        for m in (1, 2, 5):
            v = decade * m
            if lo <= v <= hi:
                out.append(f'<line x1="{ml - 4}" y1="{y(v):.1f}" x2="{ml + pw}" y2="{y(v):.1f}" stroke="#eee"/>')
                out.append(f'<text x="{ml - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g} us</text>')
        decade *= 10
    for r in rates:
        out.append(f'<text x="{x(r):.1f}" y="{mt + ph + 18}" text-anchor="middle">{r:g}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{h - 10}" text-anchor="middle">requests per second</text>')
    for i, (target, pts) in enumerate(sorted(series.items())):
        color = COLORS.get(target, "#9467bd")
        path = " ".join(f"{'M' if j == 0 else 'L'}{x(r):.1f},{y(v):.1f}" for j, (r, v) in enumerate(pts) if v > 0)
        out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for r, v in pts:
            if v > 0:
                out.append(f'<circle cx="{x(r):.1f}" cy="{y(v):.1f}" r="3" fill="{color}"/>')
        ly = mt + 10 + i * 18
        out.append(f'<line x1="{ml + pw + 15}" y1="{ly}" x2="{ml + pw + 35}" y2="{ly}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{ml + pw + 40}" y="{ly + 4}">{target}</text>')
    out.append("</svg>")
    with open(out_path, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
