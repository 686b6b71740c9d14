#!/usr/bin/env python3
"""Prints the compare.sh results (a JSON-lines file) as a Markdown table with ratios."""
import json
import sys

ROWS = {
    "fanout-max": ["deliveries_per_s", "p50_ms", "p99_ms", "max_ms", "errors"],
    "fanout-load": ["deliveries_per_s", "p50_ms", "p99_ms", "p999_ms", "errors"],
    "fanout-light": ["p50_ms", "p99_ms", "p999_ms", "errors"],
    "sio-load": ["deliveries_per_s", "p50_ms", "p99_ms", "errors"],
    "sio-max": ["deliveries_per_s", "p50_ms", "p99_ms", "max_ms", "errors"],
    "idle": ["connected", "connects_per_s", "rss_per_conn_bytes", "answered_publish", "connect_failures"],
    "sio-idle": ["connected", "connects_per_s", "rss_per_conn_bytes", "answered_publish", "connect_failures"],
    "sio-upgrade-load": ["deliveries_per_s", "p50_ms", "p99_ms", "errors"],
    "sio-upgrade-max": ["deliveries_per_s", "p50_ms", "p99_ms", "max_ms", "errors"],
    "sio-upgrade-idle": ["connected", "connects_per_s", "rss_per_conn_bytes", "answered_publish", "connect_failures"],
    "held": ["connected", "connects_per_s", "rss_per_conn_bytes", "answered_publish", "connect_failures"],
    "connect": ["connected", "connect_s", "connects_per_s", "answered_publish", "connect_failures"],
    "sio-connect": ["connected", "connect_s", "connects_per_s", "answered_publish", "connect_failures"],
    "churn": ["cycles_per_s", "errors", "tables_returned", "rss_growth_first_round_pct", "rss_growth_pct"],
}


def value(r, key):
    if key == "errors":  # lost + duplicated + misrouted + unparsable
        return sum(r.get(k, 0) or 0 for k in ("lost", "duplicates", "misrouted", "unparsable"))
    return r.get(key)


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def ratio(a, b):
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or isinstance(a, bool) or not b:
        return "-"
    return f"{a / b:.2f}×"


def main(path):
    runs = {}
    for line in open(path):
        line = line.strip()
        if line:
            r = json.loads(line)
            runs.setdefault(r["run"], {})[r["server"]] = r
    print("| scenario | measure | pulso | node | limit | pulso/node | pulso/limit |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for scen, keys in ROWS.items():
        if scen not in runs:
            continue
        by = runs[scen]
        for k in keys:
            p, n, l = (value(by[s], k) if s in by else None for s in ("pulso", "node", "limit"))
            print(f"| {scen} | {k} | {fmt(p)} | {fmt(n)} | {fmt(l)} | {ratio(p, n)} | {ratio(p, l)} |")


if __name__ == "__main__":
    main(sys.argv[1])
