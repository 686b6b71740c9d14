#!/usr/bin/env bash
# Presence under churn: the release pulso (presence in SQLite in a temp
# directory, or DB_URL) under `pulso-bench churn --mixed --distinct-subs`
# (each client its own user, so its own presence row), then the presence
# metrics: writes committed, dropped and coalesced, reconciliations, commit
# time, and the highest `pulso_presence_queue` sampled every 0.2 s.
#
#   bench/presence_load.sh WORKERS HOLD_MS SECONDS [QUEUE|default] [DB_URL]
#   bench/presence_load.sh 10000 4000 30          # 10 000 clients, stays of 0-4 s
#   PULSO_BIN=/path/to/other/pulso bench/presence_load.sh 2000 500 30
#
# Needs curl, jq and python3; builds nothing (run
# `cargo build --release --bin pulso --bin pulso-bench` first).
set -uo pipefail
W=$1; H=$2; D=$3; Q=${4:-default}
BIN="${CARGO_TARGET_DIR:-$HOME/.cache/pulso-target}/release"
WORK=$(mktemp -d /tmp/pulso-presence-load.XXXXXX)
DB=${5:-sqlite://$WORK/presence.db}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$port"
QARG=(); [ "$Q" != default ] && QARG=(--presence-queue "$Q")
"${PULSO_BIN:-$BIN/pulso}" --listen "127.0.0.1:$port" --jwt-secret bench-secret --api-key "k-$$" \
  --demo-enabled false --database-url "$DB" --node-id "presence-load-$$" "${QARG[@]}" \
  --log-level warn >"$WORK/pulso.log" 2>&1 &
PID=$!
SAMPLER=""
trap 'kill $PID 2>/dev/null; [ -n "$SAMPLER" ] && kill $SAMPLER 2>/dev/null' EXIT
for _ in $(seq 1 100); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/readyz")" = 200 ] && break
  sleep 0.1
done
(
  max=0
  while kill -0 $PID 2>/dev/null; do
    v=$(curl -s --max-time 2 "$URL/metrics" | awk '/^pulso_presence_queue /{print $2}')
    v=${v:-0}
    [ "$v" -gt "$max" ] && max=$v && echo "$max" >"$WORK/max_queue"
    sleep 0.2
  done
) &
SAMPLER=$!
"$BIN/pulso-bench" --threads 2 churn --url "127.0.0.1:$port" --secret bench-secret --label pulso \
  --mixed --distinct-subs --workers "$W" --duration "$D" --rounds 1 --hold-ms "$H" --topics 10 \
  --rate 10 --pid "$PID" --settle 30 --connect-concurrency 100 >"$WORK/churn.json" 2>"$WORK/churn.err"
echo "churn exit $?; load average $(cut -d' ' -f1-3 /proc/loadavg)"
jq -c '{cycles, errors, duration_s}' "$WORK/churn.json" 2>/dev/null
curl -s "$URL/metrics" | grep -E '^pulso_(presence_[a-z_]+|stage_latency_seconds_(sum|count)\{stage="presence_commit"\})'
echo "highest pulso_presence_queue sampled: $(cat "$WORK/max_queue" 2>/dev/null || echo 0)"
echo "pulso log: $WORK/pulso.log"
