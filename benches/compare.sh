#!/usr/bin/env bash
# Interleaved A/B runs of halfmq-bench against a separate halfmq-broker process (sync flush,
# fresh data dir per run), the way ../shared/tools/sidebyside/run.sh runs halfmq: each
# repetition runs every variant once, in turn, so drift and steal hit all alike.
# Run from the project root after `cargo build --release`:
#   benches/compare.sh OUT.jsonl "" "--no-idempotency-keys"
#   env: REPS=3 DURATION=20 WARMUP=3 BROKER_ARGS="..." (extra halfmq-broker flags)
# Each argument after OUT is one variant: extra halfmq-bench flags ("" = defaults).
# Appends one JSON line per run to OUT and prints medians per variant, with the broker's CPU
# per message (its utime+stime over the bench, divided by the messages acked) and the client's.
set -euo pipefail
OUT=${1:?usage: benches/compare.sh OUT.jsonl VARIANT...}; shift
REPS=${REPS:-3}; DURATION=${DURATION:-20}; WARMUP=${WARMUP:-3}
BIN=${BIN:-$PWD/target/release}
port=18281
for rep in $(seq 1 "$REPS"); do
  for v in "$@"; do
    d=$(mktemp -d /tmp/hq-cmp.XXXXXX)
    # shellcheck disable=SC2086
    "$BIN/halfmq-broker" --data-dir "$d" --listen 127.0.0.1:$port ${BROKER_ARGS:-} >"$d.log" 2>&1 &
    bp=$!
    for _ in $(seq 1 100); do "$BIN/halfmq" --broker 127.0.0.1:$port topic list >/dev/null 2>&1 && break; sleep 0.1; done
    ticks() { awk '{print $14 + $15}' "/proc/$bp/stat"; }
    t0=$(ticks)
    # shellcheck disable=SC2086
    line=$(timeout 300 "$BIN/halfmq-bench" --broker 127.0.0.1:$port --duration "${DURATION}s" --warmup "${WARMUP}s" --json $v 2>/dev/null | grep '^{' | tail -1) || true
    t1=$(ticks)
    kill -TERM $bp; wait $bp 2>/dev/null || true
    rm -rf "$d" "$d.log"
    [ -n "$line" ] && echo "$line" | jq -c --arg v "$v" --arg r "rep$rep" --argjson tk $((t1 - t0)) --argjson hz "$(getconf CLK_TCK)" '{variant:$v, rep:$r, published_per_s:.acked_per_s, broker_cpu_us_per_msg:(($tk * 1000000 / $hz) / ([.acked_total, 1] | max) * 10 | round / 10), client_cpu_us_per_msg:.process_cpu_us_per_msg, consumed_per_s, p50:.e2e_p50_us, p99:.e2e_p99_us, lost, duplicates, steal_pct, raw:.}' >>"$OUT"
    tail -1 "$OUT" | jq -c 'del(.raw)' >&2 || true
    sleep 2
  done
done
echo "| variant | runs | published/s (median) | consumed/s | e2e p50 us | e2e p99 us | broker CPU us/msg | client CPU us/msg | lost | steal % |"
echo "|---|---|---|---|---|---|---|---|---|---|"
jq -s -r 'group_by(.variant)[] | {v: .[0].variant, n: length, pub: (map(.published_per_s)|sort|.[length/2|floor]), con: (map(.consumed_per_s)|sort|.[length/2|floor]), p50: (map(.p50)|sort|.[length/2|floor]), p99: (map(.p99)|sort|.[length/2|floor]), bcpu: (map(.broker_cpu_us_per_msg)|sort|.[length/2|floor]), ccpu: (map(.client_cpu_us_per_msg)|sort|.[length/2|floor]), lost: (map(.lost)|add), steal: (map(.steal_pct)|sort|.[length/2|floor])} | "| \(if .v == "" then "(defaults)" else .v end) | \(.n) | \(.pub|round) | \(.con|round) | \(.p50) | \(.p99) | \(.bcpu) | \(.ccpu) | \(.lost) | \(.steal) |"' "$OUT"
