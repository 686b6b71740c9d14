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
#
# cluster (a group: cluster-load cluster-max cluster-sio-load cluster-sio-max
# cluster-sio-sweep cluster-idle-node) measures clustering: the same fan-out
# against 1 pulso node without a backplane and 1, 2 and 3 nodes over Redis
# and over NATS (clients spread over the nodes, publishes into the first), two Node
# socket.io nodes with @socket.io/redis-adapter against two pulso nodes, and
# a node with no subscriber. It starts its own redis-server on a free port
# (and a nats-server with JetStream) and needs a PostgreSQL ($CLUSTER_DATABASE_URL, default
# postgres://postgres@127.0.0.1:5432/test). See docs/cluster.md.
#
# history (a group: history-max history-load) measures what history costs on
# the publish path: the same /ws fan-out with history.topics covering the
# topic and without history, on one node and on two nodes over Redis and over NATS (the
# same setups as cluster's, off and on back to back; it needs redis-server, nats-server
# and a PostgreSQL as cluster does). See docs/history.md.
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
if [ ! -d bench/baselines/node/node_modules ] ||
   [ bench/baselines/node/package-lock.json -nt bench/baselines/node/node_modules/.package-lock.json ]; then
  echo "==> npm ci (node baseline)" >&2
  (cd bench/baselines/node && npm ci --no-audit --no-fund >&2) || { echo "npm ci failed" >&2; exit 1; }
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SERVER_PID=""    # the last server started
SERVER_PIDS=()   # every server running now (a cluster has several)
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
  SERVER_PIDS+=("$SERVER_PID")
  wait_up "$name" "$port" /healthz
}

# wait_up NAME PORT PATH: polls until PATH answers (any status; 200 for
# /readyz) while the last server started is alive.
wait_up() {
  local name=$1 port=$2 path=$3 code
  for _ in $(seq 1 150); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port$path" || true)
    if [ "$path" = /readyz ]; then [ "$code" = 200 ] && return 0
    else [ "$code" != "000" ] && return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "server $name did not start; log: $LOGS/$name.$port.log" >&2
  return 1
}

# Stops every running server: SIGTERM to all (pulso nodes then clear their
# presence rows and heartbeats), SIGKILL to any still there after 5 s.
stop_server() {
  [ ${#SERVER_PIDS[@]} -gt 0 ] || return 0
  local pid
  for pid in "${SERVER_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${SERVER_PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  SERVER_PID=""
  SERVER_PIDS=()
}

# ------------------------------------------------------------ cluster
REDIS_PID=""
REDIS_PORT=""
CLUSTER_DATABASE_URL="${CLUSTER_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
# Every cluster run gets its own cluster.prefix and node ids.
CLUSTER_TAG="cb$(date -u +%H%M%S)p$$"
CLUSTER_RUNS=0

start_redis() { # our own redis-server, on a free port, once per invocation
  [ -n "$REDIS_PID" ] && return 0
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    >"$LOGS/redis.$REDIS_PORT.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 1 100); do
    [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && return 0
    kill -0 "$REDIS_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "redis-server did not start; log: $LOGS/redis.$REDIS_PORT.log" >&2
  REDIS_PID=""
  return 1
}

NATS_PID=""
NATS_PORT=""
start_nats() { # our own nats-server with JetStream, on a free port, once per invocation
  [ -n "$NATS_PID" ] && return 0
  local bin
  bin=$(command -v nats-server || echo /usr/sbin/nats-server)
  NATS_PORT=$(free_port)
  "$bin" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$LOGS/nats.$NATS_PORT" \
    >"$LOGS/nats.$NATS_PORT.log" 2>&1 &
  NATS_PID=$!
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && return 0
    kill -0 "$NATS_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "nats-server did not start; log: $LOGS/nats.$NATS_PORT.log" >&2
  NATS_PID=""
  return 1
}

stop_nats() {
  [ -n "$NATS_PID" ] || return 0
  kill "$NATS_PID" 2>/dev/null
  wait "$NATS_PID" 2>/dev/null
  NATS_PID=""
}

stop_redis() {
  [ -n "$REDIS_PID" ] || return 0
  kill "$REDIS_PID" 2>/dev/null
  wait "$REDIS_PID" 2>/dev/null
  REDIS_PID=""
}
trap 'stop_server; stop_redis; stop_nats; exit 130' INT TERM
trap 'stop_server; stop_redis; stop_nats' EXIT

# start_setup SETUP: starts the servers of one cluster setup and sets URLS
# (their http://127.0.0.1:port, in order; publishes go to the first).
#   pulso-1          one pulso node, no backplane (PostgreSQL like the others)
#   pulso-redis-N    N pulso nodes over our Redis
#   pulso-nats-N     N pulso nodes over our NATS
#   node-redis-N     N Node baselines with @socket.io/redis-adapter on it
#   node-1           one Node baseline, no Redis
URLS=()
# Extra flags for every pulso node start_setup starts (the history scenarios
# set --history-topics here).
SETUP_ARGS=()
start_setup() {
  local setup=$1 n i port prefix
  URLS=()
  CLUSTER_RUNS=$((CLUSTER_RUNS + 1))
  prefix="$CLUSTER_TAG-$CLUSTER_RUNS"
  case $setup in
    pulso-1)
      port=$(free_port)
      "$PULSO_BIN" --jwt-secret "$SECRET" --demo-enabled false --listen "127.0.0.1:$port" \
        --database-url "$CLUSTER_DATABASE_URL" --node-id "$prefix-n1" "${SETUP_ARGS[@]}" \
        >"$LOGS/$setup.n1.$port.log" 2>&1 &
      SERVER_PID=$!; SERVER_PIDS+=("$SERVER_PID")
      wait_up "$setup.n1" "$port" /readyz || return 1
      URLS+=("http://127.0.0.1:$port") ;;
    pulso-redis-*|pulso-nats-*)
      local engine
      case $setup in
        pulso-redis-*) n=${setup#pulso-redis-}; engine=(--cluster-redis-url "redis://127.0.0.1:$REDIS_PORT") ;;
        *) n=${setup#pulso-nats-}; engine=(--cluster-nats-url "nats://127.0.0.1:$NATS_PORT") ;;
      esac
      for i in $(seq 1 "$n"); do
        port=$(free_port)
        "$PULSO_BIN" --jwt-secret "$SECRET" --demo-enabled false --listen "127.0.0.1:$port" \
          --database-url "$CLUSTER_DATABASE_URL" --node-id "$prefix-n$i" \
          "${engine[@]}" --cluster-prefix "$prefix" "${SETUP_ARGS[@]}" \
          >"$LOGS/$setup.n$i.$port.log" 2>&1 &
        SERVER_PID=$!; SERVER_PIDS+=("$SERVER_PID")
        wait_up "$setup.n$i" "$port" /readyz || return 1
        URLS+=("http://127.0.0.1:$port")
      done ;;
    node-1)
      port=$(free_port)
      (cd bench/baselines/node && exec env PORT="$port" JWT_SECRET="$SECRET" node server.js) \
        >"$LOGS/$setup.n1.$port.log" 2>&1 &
      SERVER_PID=$!; SERVER_PIDS+=("$SERVER_PID")
      wait_up "$setup.n1" "$port" /healthz || return 1
      URLS+=("http://127.0.0.1:$port") ;;
    node-redis-*)
      n=${setup#node-redis-}
      for i in $(seq 1 "$n"); do
        port=$(free_port)
        (cd bench/baselines/node && exec env PORT="$port" JWT_SECRET="$SECRET" \
          REDIS_URL="redis://127.0.0.1:$REDIS_PORT" REDIS_PREFIX="$prefix" node server.js) \
          >"$LOGS/$setup.n$i.$port.log" 2>&1 &
        SERVER_PID=$!; SERVER_PIDS+=("$SERVER_PID")
        wait_up "$setup.n$i" "$port" /healthz || return 1
        URLS+=("http://127.0.0.1:$port")
      done ;;
    *) echo "unknown cluster setup $setup" >&2; return 1 ;;
  esac
}

join_by_comma() { local IFS=,; echo "$*"; }

# bench_cluster SCEN SETUP CLIENT_NODES EXTRA_JSON ARGS...: one pulso-bench
# run against the running setup. Clients go round-robin to the first
# CLIENT_NODES nodes, publishes to the first; server CPU, Redis and every
# pulso node's backplane counters are read over the run. Appends the line
# (with EXTRA_JSON merged in); returns 1 if the tool failed.
LAST_LINE=""
bench_cluster() {
  local scen=$1 setup=$2 client_nodes=$3 extra=$4; shift 4
  local clients=("${URLS[@]:0:$client_nodes}") m=()
  case $setup in pulso-*) m=(--metrics-url "$(join_by_comma "${URLS[@]}")") ;; esac
  case $setup in *-redis-*) m+=(--redis "127.0.0.1:$REDIS_PORT") ;; esac
  local args=("$@" --url "${URLS[0]}" --client-url "$(join_by_comma "${clients[@]}")"
              --label "$setup" --secret "$SECRET" --pids "$(join_by_comma "${SERVER_PIDS[@]}")" "${m[@]}")
  echo "==> $scen against $setup (${#URLS[@]} node(s), pids ${SERVER_PIDS[*]})" >&2
  if LAST_LINE=$(timeout 600 "$BIN/pulso-bench" "${args[@]}" 2>"$LOGS/bench.$scen.$setup.log"); then
    LAST_LINE=$(echo "$LAST_LINE" | jq -c --arg s "$scen" --argjson n "${#URLS[@]}" --argjson x "$extra" \
      '. + {run: $s, nodes: $n} + $x')
    echo "$LAST_LINE" >>"$OUT"
    echo "$LAST_LINE" >&2
  else
    echo "pulso-bench failed ($scen, $setup):" >&2
    tail -5 "$LOGS/bench.$scen.$setup.log" >&2
    return 1
  fi
}

# run_cluster SCEN SETUP CLIENT_NODES ARGS...: fresh servers, one run.
run_cluster() {
  local scen=$1 setup=$2 client_nodes=$3; shift 3
  if start_setup "$setup"; then
    bench_cluster "$scen" "$setup" "$client_nodes" '{}' "$@" || failed=1
  else
    failed=1
  fi
  stop_server
}

# The rate ladder of cluster-sio-sweep, in messages per second to 2 000
# clients (x SCALE): steps of about sqrt(2). Each step runs on fresh servers
# for about SWEEP_STEP_S seconds (at least 20 messages) and passes when
# nothing is lost and p99 is at most SWEEP_P99_MS. The ladder stops after
# two steps in a row that miss; then SWEEP_REFINE more steps bisect
# (geometrically) between the best rate that passed and the lowest rate
# above it that missed.
SWEEP_RATES=(1.25 1.77 2.5 3.54 5 7.07 10 14.1 20 28.3 40 56.6 80 113 160 226 320 453 640 905 1280)
SWEEP_STEP_S="${SWEEP_STEP_S:-8}"
SWEEP_REFINE="${SWEEP_REFINE:-2}"
SWEEP_P99_MS="${SWEEP_P99_MS:-50}"

# sweep_step SCEN SETUP STEP RATE: one step; returns 0 if it passed.
sweep_step() {
  local scen=$1 setup=$2 step=$3 rate=$4 msgs ok=1
  msgs=$(python3 -c "import sys; print(max(20, int(round(float(sys.argv[1]) * float(sys.argv[2])))))" "$rate" "$SWEEP_STEP_S")
  if ! start_setup "$setup"; then failed=1; stop_server; return 2; fi
  if bench_cluster "$scen" "$setup" 2 \
       "{\"step\": $step, \"steps\": ${#SWEEP_RATES[@]}, \"p99_limit_ms\": $SWEEP_P99_MS}" \
       sio-fanout --clients "$(scaled 2000)" --messages "$msgs" --rate "$rate"; then
    echo "$LAST_LINE" | jq -e --argjson l "$SWEEP_P99_MS" \
      '.p99_ms != null and .p99_ms <= $l and .lost == 0 and .publish_errors == 0' >/dev/null && ok=0
  else
    failed=1
  fi
  stop_server
  return $ok
}

run_sweep() { # SCEN SETUP
  local scen=$1 setup=$2 rate misses=0 step=0 r best="" above="" i
  for rate in "${SWEEP_RATES[@]}"; do
    step=$((step + 1))
    sweep_step "$scen" "$setup" "$step" "$rate"
    r=$?
    [ $r -eq 2 ] && return
    if [ $r -eq 0 ]; then misses=0; best=$rate; else misses=$((misses + 1)); fi
    [ $misses -ge 2 ] && break
  done
  # The lowest rate above the best pass that missed.
  [ -n "$best" ] || return
  above=$(jq -rs --arg s "$scen" --arg setup "$setup" --argjson best "$best" --argjson l "$SWEEP_P99_MS" \
    '[.[] | select(.run == $s and .server == $setup)
          | select((.p99_ms != null and .p99_ms <= $l and .lost == 0 and .publish_errors == 0) | not)
          | (.mode | ltrimstr("rate ") | rtrimstr("/s") | tonumber) | select(. > $best)] | min // empty' "$OUT")
  [ -n "$above" ] || return
  for i in $(seq 1 "$SWEEP_REFINE"); do
    rate=$(python3 -c "import sys; print(round((float(sys.argv[1]) * float(sys.argv[2])) ** 0.5, 3))" "$best" "$above")
    step=$((step + 1))
    sweep_step "$scen" "$setup" "$step" "$rate"
    r=$?
    [ $r -eq 2 ] && return
    if [ $r -eq 0 ]; then best=$rate; else above=$rate; fi
  done
}

cluster_scenario() { # SCEN
  local scen=$1 setup
  start_redis || { failed=1; return; }
  start_nats || { failed=1; return; }
  local c m r
  c=$(scaled 2000); m=$(scaled 1000)
  case $scen in
    cluster-load)
      for setup in pulso-1 pulso-redis-1 pulso-redis-2 pulso-redis-3 pulso-nats-1 pulso-nats-2 pulso-nats-3; do
        run_cluster "$scen" "$setup" 3 fanout --clients "$c" --messages "$m" --rate 50
      done ;;
    cluster-max)
      for setup in pulso-1 pulso-redis-1 pulso-redis-2 pulso-redis-3 pulso-nats-1 pulso-nats-2 pulso-nats-3; do
        run_cluster "$scen" "$setup" 3 fanout --clients "$c" --messages "$m" --max
      done ;;
    cluster-sio-load)
      for setup in node-redis-2 pulso-redis-2; do
        run_cluster "$scen" "$setup" 2 sio-fanout --clients "$c" --messages "$m" --rate 50
      done ;;
    cluster-sio-max)
      # node-1 and pulso-1 (one node, no Redis): for reference.
      for setup in node-redis-2 pulso-redis-2 node-1 pulso-1; do
        run_cluster "$scen" "$setup" 2 sio-fanout --clients "$c" --messages "$m" --max
      done ;;
    cluster-sio-sweep)
      for setup in node-redis-2 pulso-redis-2; do run_sweep "$scen" "$setup"; done ;;
    cluster-idle-node)
      # Three nodes, subscribers on the first two only: the third must
      # receive nothing of the topic (pulso_cluster_messages_total).
      run_cluster "$scen" pulso-redis-3 2 fanout --clients "$c" --messages "$m" --rate 50 ;;
  esac
}

# The history scenarios: the same /ws fan-out with history.topics covering
# the topic ("on") and without history ("off"), on one node and on two
# nodes over Redis and over NATS, on fresh servers each time. Every setup runs
# HISTORY_ROUNDS rounds of an off and an on run back to back (the order
# alternating between rounds), so a ratio compares neighbours in time.
HISTORY_ROUNDS="${HISTORY_ROUNDS:-2}"
history_scenario() { # SCEN
  local scen=$1 setup round h c m mode=() nodes
  start_redis || { failed=1; return; }
  start_nats || { failed=1; return; }
  c=$(scaled 2000); m=$(scaled 1000)
  case $scen in
    history-max) mode=(--max) ;;
    history-load) mode=(--rate 50) ;;
  esac
  for setup in pulso-1 pulso-redis-2 pulso-nats-2; do
    nodes=${setup##*-}
    for round in $(seq 1 "$HISTORY_ROUNDS"); do
      local order=(false true)
      [ $((round % 2)) -eq 0 ] && order=(true false)
      for h in "${order[@]}"; do
        SETUP_ARGS=()
        [ "$h" = true ] && SETUP_ARGS=(--history-topics 'bench/#')
        if start_setup "$setup"; then
          bench_cluster "$scen" "$setup" "$nodes" "{\"history\": $h, \"round\": $round}" \
            fanout --clients "$c" --messages "$m" "${mode[@]}" || failed=1
        else
          failed=1
        fi
        stop_server
      done
    done
  done
  SETUP_ARGS=()
}

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

expanded=()
for scen in "${scenarios[@]}"; do
  if [ "$scen" = cluster ]; then
    expanded+=(cluster-load cluster-max cluster-sio-load cluster-sio-max cluster-sio-sweep cluster-idle-node)
  elif [ "$scen" = history ]; then
    expanded+=(history-max history-load)
  else
    expanded+=("$scen")
  fi
done

for scen in "${expanded[@]}"; do
  case $scen in
    cluster-load|cluster-max|cluster-sio-load|cluster-sio-max|cluster-sio-sweep|cluster-idle-node)
      cluster_scenario "$scen"; continue ;;
    history-max|history-load)
      history_scenario "$scen"; continue ;;
    sio-load|sio-idle|sio-max|sio-upgrade-idle|sio-upgrade-load|sio-upgrade-max|sio-connect)
      servers=(node)
      if has_sio; then servers=(pulso node); else echo "(pulso has no /socket.io/ endpoint on this build: node only)" >&2; fi ;;
    churn|held) servers=(pulso node) ;;
    fanout-max|fanout-load|fanout-light|idle|connect) servers=(pulso node limit) ;;
    *) echo "unknown scenario $scen" >&2; failed=1; continue ;;
  esac
  for server in "${servers[@]}"; do run "$scen" "$server"; done
done

stop_redis

echo
echo "Results: $OUT (logs in $LOGS)"
echo "Machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"
python3 bench/table.py "$OUT" || failed=1
exit $failed
