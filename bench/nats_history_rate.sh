#!/usr/bin/env bash
# What history costs a node over NATS: one release pulso over a nats-server
# -js of its own, on fresh servers each run, with history.topics covering
# the bench topics ("on") and without ("off"); pulso-bench fanout publishes
# 20 000 messages as fast as deliveries come back, to 1 and to 8 topics (4
# clients each), two rounds. Over NATS a node stores its tracked messages
# one after the other, each waiting for NATS's answer (docs/history.md), so
# this measures that round trip. Needs nats-server, jq, curl and the
# PostgreSQL of PULSO_BENCH_PG (default postgres://postgres@127.0.0.1:5432/test).
# One JSON line per run on stdout and in $OUT.
#
#   bench/nats_history_rate.sh
set -u
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pulso-target}"
cargo build --release --bin pulso --bin pulso-bench >&2 || exit 1
BIN=$CARGO_TARGET_DIR/release
PG="${PULSO_BENCH_PG:-postgres://postgres@127.0.0.1:5432/test}"
out="${OUT:-bench/results/$(date -u +%Y-%m-%dT%H%MZ)-nats-history-rate.jsonl}"
mkdir -p "$(dirname "$out")"; : > "$out"
for round in 1 2; do
for topics in 1 8; do
for h in off on; do
  np=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  pp=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  sd=$(mktemp -d)
  nats-server -js -sd "$sd" -a 127.0.0.1 -p $np >/dev/null 2>&1 & NPID=$!
  for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/$np) 2>/dev/null && break; sleep 0.1; done
  args=(--listen 127.0.0.1:$pp --jwt-secret bench-secret --demo-enabled false --database-url "$PG" --cluster-nats-url nats://127.0.0.1:$np --cluster-prefix r$round$topics$h --log-level warn)
  [ $h = on ] && args+=(--history-topics 'bench/#')
  $BIN/pulso "${args[@]}" >/tmp/natsrate-pulso.log 2>&1 & PPID2=$!
  for _ in $(seq 100); do [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$pp/readyz)" = 200 ] && break; sleep 0.1; done
  line=$($BIN/pulso-bench fanout --url 127.0.0.1:$pp --clients $((topics*4)) --topics $topics --messages 20000 --max 2>/dev/null | tail -1)
  echo "$line" | jq -c --arg h $h --argjson t $topics --argjson r $round '{history:$h, topics:$t, round:$r, published_msgs_per_s, deliveries_per_s, p99_ms, lost, messages}' | tee -a "$out"
  kill $PPID2 2>/dev/null; wait $PPID2 2>/dev/null; kill $NPID 2>/dev/null; wait $NPID 2>/dev/null; rm -rf "$sd"
done; done; done
