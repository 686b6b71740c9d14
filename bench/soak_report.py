#!/usr/bin/env python3
"""Reads a soak's CSV (bench/soak.sh) and the churn tool's JSON line, draws
the chart, prints one JSON line of results and exits non-zero if a check
fails: no error in the tool, every table and presence row back to zero at the
end, MQTT messages bridged, and RSS flat after warm-up (the least-squares
slope over the last two thirds of the churn, as growth over that span, under
--max-growth-pct of the mean RSS there)."""

import argparse
import csv
import json
import sys


def slope(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, my
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return b, my - b * mx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("churn_json")
    ap.add_argument("png")
    ap.add_argument("--title", default="pulso soak")
    ap.add_argument("--max-growth-pct", type=float, default=5.0)
    a = ap.parse_args()

    rows = []
    with open(a.csv) as f:
        for r in csv.DictReader(f):
            try:
                rows.append({k: float(v) for k, v in r.items()})
            except (TypeError, ValueError):
                continue  # a sample taken while pulso was stopping
    with open(a.churn_json) as f:
        lines = [l for l in f.read().splitlines() if l.strip()]
    tool = json.loads(lines[-1]) if lines else {}
    if not rows:
        print(json.dumps({"scenario": "soak", "error": "no samples"}))
        return 1

    churn_s = float(tool.get("duration_s") or rows[-1]["t_s"])
    during = [r for r in rows if r["t_s"] <= churn_s]
    tail = [r for r in during if r["t_s"] >= churn_s / 3] or during
    xs = [r["t_s"] / 60 for r in tail]
    ys = [r["rss_kib"] for r in tail]
    b, c = slope(xs, ys)
    mean = sum(ys) / len(ys)
    growth_pct = b * (xs[-1] - xs[0]) * 100 / mean if mean else 0.0
    last = rows[-1]
    cpu_s = last["cpu_s"] - rows[0]["cpu_s"]

    out = {
        "scenario": "soak",
        "minutes": round(churn_s / 60, 1),
        "workers": tool.get("workers"),
        "cycles": tool.get("cycles"),
        "cycles_ws": tool.get("cycles_ws"),
        "cycles_sio": tool.get("cycles_sio"),
        "tool_errors": tool.get("errors"),
        "publish_errors": tool.get("publish_errors"),
        "mqtt_errors": tool.get("mqtt_errors"),
        "messages_received": tool.get("messages_received"),
        "connections_opened": int(last["opened"]),
        "peak_connections": int(max(r["connections"] for r in rows)),
        "peak_presence_rows": int(max(r["presence_rows"] for r in rows)),
        "published_http_and_mqtt": int(last["published"]),
        "mqtt_in": int(last["mqtt_in"]),
        "delivered": int(last["delivered"]),
        "slow_consumer_closes": int(last["slow_consumer_closes"]),
        "rss_start_kib": int(rows[0]["rss_kib"]),
        "rss_peak_kib": int(max(r["rss_kib"] for r in rows)),
        "rss_end_of_churn_kib": int(during[-1]["rss_kib"]),
        "rss_after_kib": int(last["rss_kib"]),
        "rss_slope_kib_per_min": round(b, 1),
        "rss_growth_last_two_thirds_pct": round(growth_pct, 2),
        "cpu_s": round(cpu_s, 1),
        "cpu_pct_of_one_core": round(cpu_s * 100 / max(last["t_s"], 1), 1),
        "machine_load1_mean": round(sum(r.get("load1", 0) for r in rows) / len(rows), 1),
        "end": {k: int(last[k]) for k in ("connections", "subscriptions", "topics", "presence_rows")},
    }
    failures = []
    if tool.get("errors") or tool.get("publish_errors") or tool.get("mqtt_errors"):
        failures.append("the tool reported errors")
    if not tool.get("tables_returned"):
        failures.append("the /metrics tables did not return to their start")
    if any(out["end"].values()):
        failures.append(f"not empty at the end: {out['end']}")
    if out["mqtt_in"] == 0:
        failures.append("no MQTT message bridged")
    if growth_pct > a.max_growth_pct:
        failures.append(f"RSS grew {growth_pct:.1f} % over the last two thirds")
    out["checks"] = "ok" if not failures else failures
    print(json.dumps(out))

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install matplotlib): no chart", file=sys.stderr)
        return 1 if failures else 0
    t = [r["t_s"] / 60 for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    ax1.plot(t, [r["rss_kib"] / 1024 for r in rows], label="RSS")
    ax1.plot([xs[0], xs[-1]], [(b * xs[0] + c) / 1024, (b * xs[-1] + c) / 1024], "--",
             label=f"fit over the last two thirds: {b:+.1f} KiB/min")
    ax1.set_ylabel("pulso RSS (MiB)")
    ax1.set_ylim(bottom=0)
    ax1.legend(loc="lower right")
    ax1.grid(alpha=0.3)
    ax2.plot(t, [r["connections"] for r in rows], label="connections")
    ax2.plot(t, [r["subscriptions"] for r in rows], label="subscriptions")
    ax2.plot(t, [r["presence_rows"] for r in rows], label="presence rows", linestyle=":")
    ax2.plot(t, [r["topics"] for r in rows], label="topics and rooms")
    ax2.set_ylabel("count")
    ax2.set_xlabel("minutes")
    ax2.legend(loc="center right")
    ax2.grid(alpha=0.3)
    fig.suptitle(a.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(a.png, dpi=80)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
