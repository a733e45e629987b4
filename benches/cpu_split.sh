#!/usr/bin/env bash
# Where a message's CPU goes (issue #22, "measure first"): one halfmq-bench run against a
# separate halfmq-broker process (release, sync flush, fresh data dir), reporting over the
# measured window
#   - the broker's and the bench's CPU per operation, user and system apart (/proc/PID/stat),
#   - fdatasyncs per second and records per fdatasync (the broker's /metrics:
#     halfmq_commit_log_fsyncs_total, halfmq_group_commit_records),
#   - gRPC requests per operation (halfmq_request_seconds counts, all RPCs),
#   - context switches per operation of each process's threads (/proc/PID/task/*/status),
# and, with PERF=1, a `perf record -g` profile of the broker over the window (software clock:
# these VMs have no hardware counters), summarized with `perf report --no-children`.
# Run from the project root after `cargo build --release`:
#   benches/cpu_split.sh OUT.jsonl [halfmq-bench flags...]
#   e.g. benches/cpu_split.sh /tmp/cpu.jsonl --mode tx --rate 2000
#   env: DURATION=20 WARMUP=3 PERF=0 PERF_OUT=/tmp/halfmq-perf.txt BROKER_FLAGS="--worker-threads 1"
set -euo pipefail
OUT=${1:?usage: benches/cpu_split.sh OUT.jsonl [halfmq-bench flags...]}; shift
DURATION=${DURATION:-20}; BROKER_FLAGS=${BROKER_FLAGS:-}; WARMUP=${WARMUP:-3}; PERF=${PERF:-0}; PERF_OUT=${PERF_OUT:-/tmp/halfmq-perf.txt}
BIN=${BIN:-$PWD/target/release}
port=18681; hport=18682
d=$(mktemp -d /tmp/hq-cpu.XXXXXX)
# shellcheck disable=SC2086
"$BIN/halfmq-broker" --data-dir "$d" --listen 127.0.0.1:$port --http-listen 127.0.0.1:$hport $BROKER_FLAGS >"$d.log" 2>&1 &
bp=$!
trap 'kill $bp 2>/dev/null || true; wait $bp 2>/dev/null || true; rm -rf "$d" "$d".*' EXIT
for _ in $(seq 1 100); do "$BIN/halfmq" --broker 127.0.0.1:$port topic list >/dev/null 2>&1 && break; sleep 0.1; done
hz=$(getconf CLK_TCK)
stat_of() { awk '{print $14, $15}' "/proc/$1/stat"; }   # utime stime, ticks
# Context switches of all of a process's threads (voluntary + involuntary).
switches_of() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n + 0}'; }
scrape() {
  curl -s "http://127.0.0.1:$hport/metrics" | awk '
    /^halfmq_commit_log_fsyncs_total / {f=$2}
    /^halfmq_group_commit_records_sum / {rs=$2}
    /^halfmq_group_commit_records_count / {rc=$2}
    /^halfmq_request_seconds_count/ {r+=$2}
    END {printf "%d %d %d %d\n", f, rs, rc, r}'
}
# The bench runs 3 s past the window, so that the window (perf's start-up included) ends
# before it does.
"$BIN/halfmq-bench" --broker 127.0.0.1:$port --duration "$((DURATION + 3))s" --warmup "${WARMUP}s" --json "$@" \
  >"$d.bench" 2>"$d.bench.err" &
cp=$!
sleep "$WARMUP"
read -r bu0 bs0 < <(stat_of $bp); read -r cu0 cs0 < <(stat_of $cp); read -r f0 rs0 rc0 r0 < <(scrape)
bx0=$(switches_of $bp); cx0=$(switches_of $cp)
t0=$(date +%s.%N)
if [ "$PERF" = 1 ]; then
  perf record -F 999 -e cpu-clock -g -p $bp -o "$d.perf" -- sleep "$DURATION" >/dev/null 2>&1
else
  sleep "$DURATION"
fi
read -r bu1 bs1 < <(stat_of $bp); read -r cu1 cs1 < <(stat_of $cp); read -r f1 rs1 rc1 r1 < <(scrape)
bx1=$(switches_of $bp); cx1=$(switches_of $cp)
t1=$(date +%s.%N)
wait $cp || true
line=$(grep '^{' "$d.bench" | tail -1)
ops=$(echo "$line" | jq '.acked_per_s')
secs=$(echo "$t1 - $t0" | bc -l)
us() { echo "scale=1; $1 * 1000000 / $hz / ($ops * $secs)" | bc -l; }
jq -c -n --argjson raw "$line" --arg flags "$*" --arg broker "$BROKER_FLAGS" \
  --argjson bu "$(us $((bu1 - bu0)))" --argjson bs "$(us $((bs1 - bs0)))" \
  --argjson cu "$(us $((cu1 - cu0)))" --argjson cs "$(us $((cs1 - cs0)))" \
  --argjson fps "$(echo "scale=1; ($f1 - $f0) / $secs" | bc -l)" \
  --argjson rpf "$(echo "scale=2; ($rs1 - $rs0) / ($rc1 - $rc0 + 0.000001)" | bc -l)" \
  --argjson rpo "$(echo "scale=2; ($r1 - $r0) / ($ops * $secs)" | bc -l)" \
  --argjson bx "$(echo "scale=2; ($bx1 - $bx0) / ($ops * $secs)" | bc -l)" \
  --argjson cx "$(echo "scale=2; ($cx1 - $cx0) / ($ops * $secs)" | bc -l)" \
  '{flags:$flags, broker_flags:$broker, ops_per_s:$raw.acked_per_s, e2e_p50_us:$raw.e2e_p50_us, e2e_p99_us:$raw.e2e_p99_us,
    broker_user_us_per_op:$bu, broker_sys_us_per_op:$bs, bench_user_us_per_op:$cu, bench_sys_us_per_op:$cs,
    broker_switches_per_op:$bx, bench_switches_per_op:$cx,
    fdatasyncs_per_s:$fps, records_per_fdatasync:$rpf, requests_per_op:$rpo, steal_pct:$raw.steal_pct}' | tee -a "$OUT"
if [ "$PERF" = 1 ]; then
  cp "$d.perf" "$PERF_OUT.data"
  { perf report -i "$d.perf" --no-children --stdio -g none --sort comm,dso,sym --percent-limit 0.5 2>/dev/null | grep -v '^$' | grep -v '^#' | head -80
    echo; perf report -i "$d.perf" --no-children --stdio --percent-limit 2 2>/dev/null | grep -v '^$' | head -300; } >"$PERF_OUT"
  echo "profile: $PERF_OUT" >&2
fi
