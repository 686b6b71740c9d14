#!/usr/bin/env bash
# Runs every fuzz target (or those named) for FUZZ_SECONDS each (1800 by
# default), FUZZ_JOBS at a time (1 by default), from the committed corpus,
# with the limits of .ci/run; new inputs go to a scratch corpus, and those
# that add coverage are merged into fuzz/corpus/<target> at the end.
# Prints one line per target: time, executions, coverage, peak RSS, result.
#
#   nice -n 19 fuzz/run-long.sh                      # all targets, 30 min each
#   FUZZ_SECONDS=60 FUZZ_JOBS=2 fuzz/run-long.sh ws_frame sio_packet
set -euo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-1800}"
jobs="${FUZZ_JOBS:-1}"
target_dir="${CARGO_TARGET_DIR:-$HOME/.cache/pulso-target}-cargo-fuzz"
logs="${FUZZ_LOGS:-/tmp/pulso-fuzz-long}"
mkdir -p "$logs"
cargo +nightly fuzz build --target-dir "$target_dir" >/dev/null
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)

# As `cargo fuzz run` does: the bundled SQLite trips ASan's ODR check.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"
bin_dir="$target_dir/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"

run_one() {
  local t="$1" scratch="$logs/corpus-$1" log="$logs/$1.log" result="no crash"
  mkdir -p "$scratch" "corpus/$t" "artifacts/$t"
  local started=$SECONDS
  # The target's binary itself (what `cargo fuzz run` runs), so that
  # parallel runs do not wait on cargo's locks.
  if ! "$bin_dir/$t" -artifact_prefix="artifacts/$t/" "$scratch" "corpus/$t" \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 \
      -print_final_stats=1 >"$log" 2>&1; then
    result="FAILED (input in fuzz/artifacts/$t/, log $log)"
  fi
  local took=$((SECONDS - started))
  # Inputs that add coverage join the committed corpus.
  "$bin_dir/$t" -merge=1 "corpus/$t" "$scratch" >"$log.merge" 2>&1 || true
  printf '%-14s %5d s  %12s execs  cov %6s  peak rss %5s MB  %s\n' "$t" "$took" \
    "$(grep -oP '^stat::number_of_executed_units:\s+\K[0-9]+' "$log" || echo ?)" \
    "$(grep -oP 'cov: \K[0-9]+' "$log" | tail -n1 || echo ?)" \
    "$(grep -oP '^stat::peak_rss_mb:\s+\K[0-9]+' "$log" || echo ?)" "$result"
}
export -f run_one
export seconds target_dir logs bin_dir
printf '%s\n' "${targets[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one {}'
