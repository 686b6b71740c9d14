#!/usr/bin/env bash
# Runs the same pulso-bench scenarios against pulso, the Node baseline and the
# limit server, each started fresh on a free loopback port, one after another,
# and prints absolute figures and ratios. Never asserts performance: it exits
# non-zero only when a tool or server fails.
#
#   bench/compare.sh                    # default scenarios (about 5 minutes)
#   bench/compare.sh fanout-max idle    # some of them
#   SCALE=0.2 bench/compare.sh          # smaller sizes (quick look)
#   PULSO_BIN=/path/to/pulso bench/compare.sh sio-load   # another pulso build
#
# Scenarios: fanout-max fanout-load fanout-light sio-load idle churn (default
# set), held (idle with 19 800 connections; pulso and node only), sio-idle
# (idle Socket.IO connections), sio-max (Socket.IO fan-out publishing as
# fast as answers come back), sio-upgrade-idle/-load/-max (the same
# with clients that poll first and upgrade, as socket.io-client does by
# default), and connect / sio-connect (19 000 clients connecting at once, as
# after a deploy: each counts once it is answered, which for pulso means its
# presence row is committed); the Socket.IO ones run against node, and
# against pulso when it serves /socket.io/.
# Results: one JSON line per run in $OUT (default bench/results/<date>.jsonl).
set -uo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pulso-target}"
BIN="$CARGO_TARGET_DIR/release"
# Another pulso build may be measured instead (e.g. a branch with Socket.IO).
PULSO_BIN="${PULSO_BIN:-$BIN/pulso}"
SECRET=bench-secret
SCALE="${SCALE:-1}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="${OUT:-bench/results/$STAMP.jsonl}"
LOGS="$(mktemp -d /tmp/pulso-compare.XXXXXX)"
mkdir -p "$(dirname "$OUT")"
: >"$OUT"
failed=0

scenarios=("$@")
[ ${#scenarios[@]} -eq 0 ] && scenarios=(fanout-max fanout-load fanout-light sio-load idle churn)

scaled() { python3 -c "import sys; print(max(1, int(round($1 * float(sys.argv[1])))))" "$SCALE"; }

echo "==> build (release)" >&2
cargo build --release --bin pulso --bin pulso-bench >&2 || { echo "build failed" >&2; exit 1; }
if [ ! -d bench/baselines/node/node_modules ]; then
  echo "==> npm ci (node baseline)" >&2
  (cd bench/baselines/node && npm ci --no-audit --no-fund >&2) || { echo "npm ci failed" >&2; exit 1; }
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SERVER_PID=""
start_server() { # name port
  local name=$1 port=$2
  case $name in
    pulso) "$PULSO_BIN" --jwt-secret "$SECRET" --demo-enabled false --listen "127.0.0.1:$port" \
             >"$LOGS/$name.$port.log" 2>&1 &
           SERVER_PID=$! ;;
    node)  (cd bench/baselines/node && exec env PORT="$port" JWT_SECRET="$SECRET" node server.js) \
             >"$LOGS/$name.$port.log" 2>&1 &
           SERVER_PID=$! ;;
    limit) "$BIN/pulso-bench" limit-server --listen "127.0.0.1:$port" >"$LOGS/$name.$port.log" 2>&1 &
           SERVER_PID=$! ;;
  esac
  for _ in $(seq 1 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/healthz" || true)
    [ "$code" != "000" ] && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "server $name did not start; log: $LOGS/$name.$port.log" >&2
  return 1
}

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill "$SERVER_PID" 2>/dev/null
  for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$SERVER_PID" 2>/dev/null
  wait "$SERVER_PID" 2>/dev/null
  SERVER_PID=""
}
trap 'stop_server; exit 130' INT TERM

# run SCENARIO SERVER: starts the server fresh, runs, appends the JSON line.
run() {
  local scen=$1 server=$2 port args=()
  port=$(free_port)
  start_server "$server" "$port" || { failed=1; return; }
  local common=(--url "127.0.0.1:$port" --label "$server" --secret "$SECRET")
  case $scen in
    fanout-max)   args=(fanout "${common[@]}" --clients "$(scaled 2000)" --messages "$(scaled 1000)" --max) ;;
    fanout-load)  args=(fanout "${common[@]}" --clients "$(scaled 2000)" --messages "$(scaled 1000)" --rate 50) ;;
    fanout-light) args=(fanout "${common[@]}" --clients "$(scaled 2000)" --messages "$(scaled 150)" --rate 10) ;;
    sio-load)     args=(sio-fanout "${common[@]}" --clients "$(scaled 2000)" --messages "$(scaled 1000)" --rate 50) ;;
    sio-max)      args=(sio-fanout "${common[@]}" --clients "$(scaled 2000)" --messages "$(scaled 1000)" --max) ;;
    idle)         args=(idle "${common[@]}" --clients "$(scaled 10000)" --pid "$SERVER_PID" --hold 3) ;;
    sio-idle)     args=(idle "${common[@]}" --proto sio --clients "$(scaled 10000)" --pid "$SERVER_PID" --hold 3) ;;
    sio-upgrade-idle) args=(idle "${common[@]}" --proto sio --sio-upgrade --clients "$(scaled 10000)" --pid "$SERVER_PID" --hold 3) ;;
    sio-upgrade-load) args=(sio-fanout "${common[@]}" --sio-upgrade --clients "$(scaled 2000)" --messages "$(scaled 1000)" --rate 50) ;;
    sio-upgrade-max)  args=(sio-fanout "${common[@]}" --sio-upgrade --clients "$(scaled 2000)" --messages "$(scaled 1000)" --max) ;;
    held)         args=(idle "${common[@]}" --clients 19800 --pid "$SERVER_PID" --hold 3) ;;
    connect)      args=(idle "${common[@]}" --clients "$(scaled 19000)" --pid "$SERVER_PID" --hold 1) ;;
    sio-connect)  args=(idle "${common[@]}" --proto sio --clients "$(scaled 19000)" --pid "$SERVER_PID" --hold 1) ;;
    churn)        args=(churn "${common[@]}" --duration "$(scaled 10)" --rounds 2 --pid "$SERVER_PID") ;;
  esac
  echo "==> $scen against $server (port $port, pid $SERVER_PID)" >&2
  local line
  if line=$(timeout 600 "$BIN/pulso-bench" "${args[@]}" 2>"$LOGS/bench.$scen.$server.log"); then
    echo "$line" | jq -c --arg s "$scen" '. + {run: $s}' >>"$OUT"
    echo "$line" | jq -c '.' >&2
  else
    echo "pulso-bench failed ($scen, $server):" >&2
    tail -5 "$LOGS/bench.$scen.$server.log" >&2
    failed=1
  fi
  stop_server
}

has_sio() { # does pulso serve /socket.io/ on this branch?
  local port code
  port=$(free_port)
  start_server pulso "$port" || return 1
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/socket.io/?EIO=4&transport=polling")
  stop_server
  [ "$code" = "200" ]
}

for scen in "${scenarios[@]}"; do
  case $scen in
    sio-load|sio-idle|sio-max|sio-upgrade-idle|sio-upgrade-load|sio-upgrade-max|sio-connect)
      servers=(node)
      if has_sio; then servers=(pulso node); else echo "(pulso has no /socket.io/ endpoint on this build: node only)" >&2; fi ;;
    churn|held) servers=(pulso node) ;;
    fanout-max|fanout-load|fanout-light|idle|connect) servers=(pulso node limit) ;;
    *) echo "unknown scenario $scen" >&2; failed=1; continue ;;
  esac
  for server in "${servers[@]}"; do run "$scen" "$server"; done
done

echo
echo "Results: $OUT (logs in $LOGS)"
echo "Machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"
python3 bench/table.py "$OUT" || failed=1
exit $failed
