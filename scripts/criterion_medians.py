#!/usr/bin/env python3
"""Print the median of every criterion benchmark under target/criterion as a Markdown table.

Usage: python3 scripts/criterion_medians.py [GROUP_PREFIX ...]
"""
import json
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parent.parent / "target" / "criterion"
prefixes = sys.argv[1:]


def fmt(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.1f} ns"


rows = []
for est in sorted(root.glob("**/new/estimates.json")):
    bench = est.parent.parent.relative_to(root).as_posix()
    if prefixes and not any(bench.startswith(p) for p in prefixes):
        continue
    data = json.loads(est.read_text())
    med = data["median"]
    rows.append((bench, med["point_estimate"], med["confidence_interval"]))

print("| benchmark | median | 95% CI |")
print("|---|---|---|")
for bench, m, ci in rows:
    print(f"| {bench} | {fmt(m)} | {fmt(ci['lower_bound'])} – {fmt(ci['upper_bound'])} |")
