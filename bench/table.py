#!/usr/bin/env python3
"""Prints the compare.sh results (a JSON-lines file) as Markdown tables with ratios."""
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


def num(v, digits=3):
    """A figure as measured (thousands separated), or '-'."""
    if v is None:
        return "-"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 100:
        v = int(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}g}" if abs(v) < 100 else f"{v:,.0f}"


def errors(r):
    return value(r, "errors") + (r.get("publish_errors") or 0)


def cluster_tables(lines):
    by_run = {}
    for r in lines:
        by_run.setdefault(r["run"], []).append(r)
    head = ("| scenario | setup | clients per node | deliveries/s | p50 ms | p99 ms "
            "| node CPU µs/delivery | Redis commands/msg | Redis bytes out/msg | errors | deliveries/s ratio |")
    rule = "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for scen, base in (("cluster-load", "pulso-1"), ("cluster-max", "pulso-1"),
                       ("cluster-sio-load", "node-redis-2"), ("cluster-sio-max", "node-redis-2")):
        rs = by_run.get(scen)
        if not rs:
            continue
        print()
        print(f"{scen} (ratio: deliveries/s over {base}'s)")
        print()
        print(head)
        print(rule)
        ref = next((r for r in rs if r["server"] == base), None)
        for r in rs:
            per = r.get("clients_per_server") or [r.get("clients")]
            print(f"| {scen} | {r['server']} | {' + '.join(str(x) for x in per)} "
                  f"| {num(r.get('deliveries_per_s'))} | {num(r.get('p50_ms'))} | {num(r.get('p99_ms'))} "
                  f"| {num(r.get('cpu_us_per_delivery'))} | {num(r.get('redis_commands_per_message'))} "
                  f"| {num(r.get('redis_out_bytes_per_message'))} | {errors(r)} "
                  f"| {ratio(r.get('deliveries_per_s'), ref.get('deliveries_per_s')) if ref else '-'} |")

    rs = by_run.get("cluster-sio-sweep")
    if rs:
        print()
        print("cluster-sio-sweep (fixed rates, fresh servers per step; pass: p99 within the limit, nothing lost)")
        print()
        print("| setup | step | msg/s offered | deliveries/s offered | deliveries/s | p50 ms | p99 ms "
              "| node CPU µs/delivery | errors | pass |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        best = {}
        for r in rs:
            ok = (r.get("p99_ms") is not None and r["p99_ms"] <= r.get("p99_limit_ms", 50)
                  and r.get("lost") == 0 and not r.get("publish_errors"))
            if ok and r.get("deliveries_per_s", 0) > best.get(r["server"], {}).get("deliveries_per_s", 0):
                best[r["server"]] = r
            rate = r["mode"].removeprefix("rate ").removesuffix("/s")
            print(f"| {r['server']} | {r.get('step')} | {rate} | {num(r.get('offered_deliveries_per_s'))} "
                  f"| {num(r.get('deliveries_per_s'))} | {num(r.get('p50_ms'))} | {num(r.get('p99_ms'))} "
                  f"| {num(r.get('cpu_us_per_delivery'))} | {errors(r)} | {'yes' if ok else 'no'} |")
        print()
        for s, r in best.items():
            top = r.get("step") == r.get("steps")
            print(f"- {s}: {'at least' if top else 'at most'} {num(r['deliveries_per_s'])} deliveries/s "
                  f"with p99 ≤ {r.get('p99_limit_ms', 50)} ms (step {r.get('step')}: p99 {num(r['p99_ms'])} ms"
                  f"{', the top of the ladder' if top else ''})")
        p, n = best.get("pulso-redis-2"), best.get("node-redis-2")
        if p and n:
            print(f"- pulso-redis-2 / node-redis-2: {ratio(p['deliveries_per_s'], n['deliveries_per_s'])}")

    rs = by_run.get("cluster-idle-node")
    if rs:
        for r in rs:
            print()
            print(f"cluster-idle-node ({r.get('messages')} messages into node 1; clients "
                  f"{' + '.join(str(x) for x in r.get('clients_per_server') or [])} on nodes 1 and 2)")
            print()
            print("| node | clients | sent | received | duplicate | unsent | CPU s over the run |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            per = r.get("clients_per_server") or []
            cpu = r.get("server_cpu_s") or []
            for i, node in enumerate(r.get("cluster_messages") or []):
                print(f"| {i + 1} | {per[i] if i < len(per) else 0} | {node.get('sent', '-')} "
                      f"| {node.get('received', '-')} | {node.get('duplicate', '-')} | {node.get('unsent', '-')} "
                      f"| {num(cpu[i]) if i < len(cpu) else '-'} |")
            two = next((x for x in by_run.get("cluster-load", []) if x["server"] == "pulso-redis-2"), None)
            print()
            print(f"Redis per message: {num(r.get('redis_commands_per_message'))} commands, "
                  f"{num(r.get('redis_out_bytes_per_message'))} bytes out, "
                  f"{num(r.get('redis_in_bytes_per_message'))} bytes in"
                  + (f" (two nodes, cluster-load pulso-redis-2: {num(two.get('redis_commands_per_message'))}, "
                     f"{num(two.get('redis_out_bytes_per_message'))}, {num(two.get('redis_in_bytes_per_message'))})"
                     if two else ""))


def history_tables(lines):
    """history-max / history-load: each run with history on against the run
    with it off of the same setup and round (its neighbour in time)."""
    by_run = {}
    for r in lines:
        by_run.setdefault(r["run"], []).append(r)
    for scen in ("history-max", "history-load"):
        rs = by_run.get(scen)
        if not rs:
            continue
        print()
        print(f"{scen} (on/off: history on over history off, same setup and round)")
        print()
        print("| setup | round | history | deliveries/s | p50 ms | p99 ms | node CPU µs/delivery "
              "| Redis commands/msg | errors | deliveries/s on/off | p99 on/off |")
        print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rs:
            off = next((x for x in rs if x["server"] == r["server"] and x.get("round") == r.get("round")
                        and not x.get("history")), None)
            on = r.get("history")
            print(f"| {r['server']} | {r.get('round', '-')} | {'on' if on else 'off'} "
                  f"| {num(r.get('deliveries_per_s'))} | {num(r.get('p50_ms'))} | {num(r.get('p99_ms'))} "
                  f"| {num(r.get('cpu_us_per_delivery'))} | {num(r.get('redis_commands_per_message'))} "
                  f"| {errors(r)} "
                  f"| {ratio(r.get('deliveries_per_s'), off.get('deliveries_per_s')) if on and off else '-'} "
                  f"| {ratio(r.get('p99_ms'), off.get('p99_ms')) if on and off else '-'} |")


def main(path):
    runs = {}
    cluster = []
    history = []
    for line in open(path):
        line = line.strip()
        if line:
            r = json.loads(line)
            if r["run"].startswith("cluster"):
                cluster.append(r)
                continue
            if r["run"].startswith("history"):
                history.append(r)
                continue
            runs.setdefault(r["run"], {})[r["server"]] = r
    if runs:
        table(runs)
    if cluster:
        cluster_tables(cluster)
    if history:
        history_tables(history)


def table(runs):
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
