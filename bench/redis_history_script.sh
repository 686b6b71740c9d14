#!/usr/bin/env bash
# What Redis spends on one tracked publish: the history script
# (PUBLISH_SCRIPT in src/cluster/redis.rs) of each git revision named
# (default: HEAD), run by redis-benchmark against a redis-server of its
# own (one tracked room, history.size 100, so streams are full and every
# publish trims), the revisions alternating, ROUNDS rounds (default 4).
# Prints Redis's own count per publish: microseconds of its CPU
# (EVALSHA's usec_per_call) and the commands run (EVALSHA included).
# Compare revisions within one run: the machine's load moves the figures.
#
#   bench/redis_history_script.sh HEAD~1 HEAD
set -euo pipefail
cd "$(dirname "$0")/.."
revs=("$@")
[ ${#revs[@]} -gt 0 ] || revs=(HEAD)
rounds="${ROUNDS:-4}"
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
redis=$!
trap 'kill $redis; rm -rf "$dir"' EXIT
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
for i in "${!revs[@]}"; do
  git show "${revs[$i]}:src/cluster/redis.rs" |
    python3 -c 'import re,sys; print(re.search(r"const PUBLISH_SCRIPT: &str = r#\"(.*?)\"#;", sys.stdin.read(), re.S).group(1))' >"$dir/$i.lua"
done
body='{"rooms":["bench/t"],"event":null,"payload":{"n":12345,"text":"a message of a realistic size for a benchmark run"},"ts":1765100000000}'
for round in $(seq 1 "$rounds"); do
  for i in "${!revs[@]}"; do
    sha=$(redis-cli -p "$port" script load "$(cat "$dir/$i.lua")")
    redis-cli -p "$port" flushall >/dev/null
    redis-cli -p "$port" config resetstat >/dev/null
    # Keys: the sequence, the room's numbers, its stream; then the body,
    # size, ttl (ms), numbers' keep (ms), a new epoch, one room, its
    # channel, tracked.
    redis-benchmark -p "$port" -q -n 200000 -c 4 -P 16 evalsha "$sha" 3 \
      p:h:seq "p:h:{bench/t}:m" "p:h:{bench/t}" "$body" 100 60000 86400000 "e$round" 1 p:t:bench/t 1 >/dev/null
    stats=$(redis-cli -p "$port" info commandstats)
    calls=$(grep '^cmdstat_evalsha' <<<"$stats" | grep -oP '[:,]calls=\K[0-9]+')
    usec=$(grep '^cmdstat_evalsha' <<<"$stats" | grep -oP 'usec_per_call=\K[0-9.]+')
    # Every command counted, less the two CONFIG RESETSTAT and INFO of this script.
    total=$(grep -oP '[:,]calls=\K[0-9]+' <<<"$stats" | paste -sd+ | bc)
    printf 'round %s  %-12s  %6s µs of Redis CPU per publish  %5s commands per publish\n' \
      "$round" "${revs[$i]}" "$usec" "$(echo "scale=2; ($total - 2) / $calls" | bc)"
  done
done
