#!/usr/bin/env bash
# Soak: the release pulso under continuous churn for SOAK_MINUTES (default
# 30): SOAK_CLIENTS (default 5 000) clients, half on /ws and half on
# Socket.IO (Engine.IO 4 over WebSocket, authenticated), each connecting,
# subscribing, receiving for 2-20 s, leaving and coming back; messages
# published over HTTP to both protocols and over MQTT through pulso's bridge
# (the broker at SOAK_MQTT, default 127.0.0.1:1883). Every 5 s it samples
# pulso's RSS and CPU time, /metrics and the presence rows into a CSV under
# docs/bench-runs/, then draws docs/performance-soak.png and checks:
# connections, subscriptions, topics and presence rows back to zero once
# every client has left, no error in the tool, and the RSS slope over the
# last two thirds (bench/soak_report.py). Exits non-zero when a check fails.
#
#   bench/soak.sh                          # 30 min, 5 000 clients
#   SOAK_MINUTES=2 SOAK_CLIENTS=500 bench/soak.sh   # a quick look
#   nice -n 5 bench/soak.sh                # on a machine others use
#
# Needs cargo, curl, jq, python3 with matplotlib, and an MQTT broker.
set -uo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pulso-target}"
BIN="$CARGO_TARGET_DIR/release"
MINUTES="${SOAK_MINUTES:-30}"
CLIENTS="${SOAK_CLIENTS:-5000}"
MQTT="${SOAK_MQTT:-127.0.0.1:1883}"
RATE="${SOAK_RATE:-20}"           # HTTP publishes per second, per protocol
MQTT_RATE="${SOAK_MQTT_RATE:-10}" # MQTT publishes per second
HOLD_MS="${SOAK_HOLD_MS:-20000}"  # longest stay of a client
SECRET=bench-secret
KEY="soak-$$-$RANDOM"
STAMP="$(date -u +%Y-%m-%dT%H%MZ)"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
CSV="${SOAK_CSV:-docs/bench-runs/$STAMP-$COMMIT-soak.csv}"
JSONL="${CSV%.csv}.jsonl"
PNG="${SOAK_PNG:-docs/performance-soak.png}"
WORK="$(mktemp -d /tmp/pulso-soak.XXXXXX)"

echo "==> build (release)" >&2
cargo build --release --bin pulso --bin pulso-bench >&2 || { echo "build failed" >&2; exit 1; }

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$port"
"$BIN/pulso" --listen "127.0.0.1:$port" --jwt-secret "$SECRET" --api-key "$KEY" \
  --demo-enabled false --database-url "sqlite://$WORK/presence.db" \
  --mqtt-url "mqtt://$MQTT" --mqtt-topics 'bench/+' --mqtt-client-id "pulso-soak-$$" \
  --log-level warn >"$WORK/pulso.log" 2>&1 &
PID=$!
SAMPLER=""
cleanup() {
  [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null
  kill "$PID" 2>/dev/null
  for _ in $(seq 1 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$PID" 2>/dev/null
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/readyz")" = 200 ] && break
  kill -0 "$PID" 2>/dev/null || { echo "pulso did not start: $WORK/pulso.log" >&2; exit 1; }
  sleep 0.1
done
for _ in $(seq 1 100); do # the bridge must be up before MQTT publishes start
  curl -s "$URL/metrics" | grep -q '^pulso_mqtt_connected 1' && break
  sleep 0.1
done

# One CSV row: the time, pulso's RSS and CPU seconds, the /metrics gauges and
# counters, the presence rows, the machine's load average (1 min).
TICK=$(getconf CLK_TCK)
sample() {
  local t=$1 rss cpu metrics presence
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$PID/status" 2>/dev/null)
  cpu=$(awk -v hz="$TICK" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$PID/stat" 2>/dev/null)
  metrics=$(curl -s --max-time 4 "$URL/metrics" | awk '
    !/^#/ { split($1, n, "{"); v[n[1]] += $NF }
    END { printf "%d,%d,%d,%d,%d,%d,%d,%d", v["pulso_connections"], v["pulso_subscriptions"],
      v["pulso_topics"], v["pulso_messages_published_total"], v["pulso_mqtt_messages_in_total"],
      v["pulso_messages_delivered_total"], v["pulso_slow_consumer_closes_total"],
      v["pulso_connections_opened_total"] }')
  presence=$(curl -s --max-time 4 -H "Authorization: Bearer $KEY" "$URL/api/presence" | jq '.sockets | length')
  echo "$t,${rss:-},${cpu:-},$metrics,${presence:-},$(cut -d' ' -f1 /proc/loadavg)"
}
mkdir -p "$(dirname "$CSV")"
echo "t_s,rss_kib,cpu_s,connections,subscriptions,topics,published,mqtt_in,delivered,slow_consumer_closes,opened,presence_rows,load1" >"$CSV"
START=$(date +%s)
(
  while kill -0 "$PID" 2>/dev/null; do
    sample $(($(date +%s) - START)) >>"$CSV"
    sleep 5
  done
) &
SAMPLER=$!

echo "==> churn: $CLIENTS clients, $MINUTES min, pulso pid $PID on port $port" >&2
"$BIN/pulso-bench" --threads 2 churn --url "127.0.0.1:$port" --secret "$SECRET" --label pulso \
  --mixed --distinct-subs --workers "$CLIENTS" --duration $((MINUTES * 60)) --rounds 1 --hold-ms "$HOLD_MS" \
  --ramp 10 --topics 10 --rate "$RATE" --mqtt "$MQTT" --mqtt-rate "$MQTT_RATE" \
  --pid "$PID" --settle 60 --connect-concurrency 100 >"$WORK/churn.json"
tool=$?

# Every client has left: wait (at most 60 s) for the presence rows too.
for _ in $(seq 1 120); do
  [ "$(curl -s -H "Authorization: Bearer $KEY" "$URL/api/presence" | jq '.sockets | length')" = 0 ] && break
  sleep 0.5
done
kill "$SAMPLER" 2>/dev/null
wait "$SAMPLER" 2>/dev/null
SAMPLER=""
sample $(($(date +%s) - START)) >>"$CSV"

cat "$WORK/churn.json" >"$JSONL"
python3 bench/soak_report.py "$CSV" "$WORK/churn.json" "$PNG" \
  --title "pulso soak: $CLIENTS clients (/ws + Socket.IO) churning, HTTP + MQTT publishes, $MINUTES min ($STAMP, $COMMIT)" \
  | tee -a "$JSONL"
report=${PIPESTATUS[0]}
echo "CSV: $CSV  chart: $PNG  pulso log: $WORK/pulso.log" >&2
[ "$tool" = 0 ] && [ "$report" = 0 ]
