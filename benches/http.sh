#!/usr/bin/env bash
# What the HTTP endpoint costs the hot path (issue #21: at most 3 % fewer msg/s): interleaved
# runs of halfmq-bench against a separate halfmq-broker process (sync flush, fresh data dir per
# run) with the endpoint "off" (--http-listen ""), "on" (the default: the histograms
# halfmq_fsync_seconds, halfmq_group_commit_records and halfmq_request_seconds are recorded)
# and "scraped" (on, with /metrics fetched every SCRAPE_S seconds during the run). Each
# repetition runs every variant once, in turn, for each mode (normal sends, then transactions),
# so drift and steal hit all alike.
# Run from the project root after `cargo build --release`:
#   benches/http.sh OUT.jsonl        env: REPS=3 DURATION=20 WARMUP=3 MODES="normal tx"
#   VARIANTS="off on scraped" SCRAPE_S=1
# Appends one JSON line per run to OUT and prints medians per (mode, variant) with the ratio
# to "off" of the same mode.
set -euo pipefail
OUT=${1:?usage: benches/http.sh OUT.jsonl}
REPS=${REPS:-3}; DURATION=${DURATION:-20}; WARMUP=${WARMUP:-3}; MODES=${MODES:-"normal tx"}
SCRAPE_S=${SCRAPE_S:-1}
BIN=${BIN:-$PWD/target/release}
port=18581; hport=18582
for rep in $(seq 1 "$REPS"); do
  for mode in $MODES; do
    for v in ${VARIANTS:-off on scraped}; do
      d=$(mktemp -d /tmp/hq-http.XXXXXX)
      http=127.0.0.1:$hport; [ "$v" = off ] && http=
      "$BIN/halfmq-broker" --data-dir "$d" --listen 127.0.0.1:$port --http-listen "$http" >"$d.log" 2>&1 &
      bp=$!
      for _ in $(seq 1 100); do "$BIN/halfmq" --broker 127.0.0.1:$port topic list >/dev/null 2>&1 && break; sleep 0.1; done
      sp=
      if [ "$v" = scraped ]; then
        (while sleep "$SCRAPE_S"; do curl -s -o /dev/null "http://$http/metrics" || true; done) &
        sp=$!
      fi
      ticks() { awk '{print $14 + $15}' "/proc/$bp/stat"; }
      t0=$(ticks)
      line=$(timeout 300 "$BIN/halfmq-bench" --broker 127.0.0.1:$port --mode "$mode" --duration "${DURATION}s" --warmup "${WARMUP}s" --json 2>/dev/null | grep '^{' | tail -1) || true
      t1=$(ticks)
      [ -n "$sp" ] && { kill "$sp"; wait "$sp" 2>/dev/null || true; }
      kill -TERM $bp; wait $bp 2>/dev/null || true
      rm -rf "$d" "$d.log"
      [ -n "$line" ] && echo "$line" | jq -c --arg v "$v" --arg m "$mode" --arg r "rep$rep" --argjson tk $((t1 - t0)) --argjson hz "$(getconf CLK_TCK)" '{variant:$v, mode:$m, rep:$r, published_per_s:.acked_per_s, broker_cpu_us_per_msg:(($tk * 1000000 / $hz) / ([.acked_total, 1] | max) * 10 | round / 10), p50:.e2e_p50_us, p99:.e2e_p99_us, lost, duplicates, steal_pct}' >>"$OUT"
      tail -1 "$OUT" >&2 || true
      sleep 2
    done
  done
done
echo "| mode | variant | runs | acked/s (median) | vs off | e2e p50 us | e2e p99 us | broker CPU us/msg | lost |"
echo "|---|---|---|---|---|---|---|---|---|"
jq -s -r '(group_by(.mode) | map({key: .[0].mode, value: (map(select(.variant == "off")) | map(.published_per_s) | sort | .[length/2|floor])}) | from_entries) as $off
  | group_by(.mode + " " + .variant)[] | {m: .[0].mode, v: .[0].variant, n: length, pub: (map(.published_per_s)|sort|.[length/2|floor]), p50: (map(.p50)|sort|.[length/2|floor]), p99: (map(.p99)|sort|.[length/2|floor]), cpu: (map(.broker_cpu_us_per_msg)|sort|.[length/2|floor]), lost: (map(.lost)|add)}
  | "| \(.m) | \(.v) | \(.n) | \(.pub|round) | \((.pub / $off[.m] * 100 | round) / 100)x | \(.p50) | \(.p99) | \(.cpu) | \(.lost) |"' "$OUT"
