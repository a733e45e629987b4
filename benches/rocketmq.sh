#!/usr/bin/env bash
# The official RocketMQ 5 clients against halfmq next to halfmq's own client, in one run,
# interleaved: each repetition runs every (client, mode) once against a fresh halfmq-broker
# process (release build, sync flush, fresh data dir), so drift and steal hit all alike.
# Closed loop, CONC operations in flight, 1 KiB bodies, no consumers; an operation is one
# send ("send") or a half message plus its commit ("tx").
#   halfmq   halfmq-bench --inflight CONC --consumers 0 (its client's auto-batch on: its
#            normal shape) and halfmq-nobatch (--no-auto-batch: one message per request,
#            as the RocketMQ clients send)
#   rust     crates.io rocketmq 5.0.0 (tests/rocketmq/rust, built --release), CONC tasks
#   python   PyPI rocketmq-python-client, CONC threads
# Run from the project root after `cargo build --release` and `tests/rocketmq/setup.sh`, with
# the Rust scenarios built --release:
#   CARGO_TARGET_DIR=target/rocketmq-clients/rust-target cargo build --release \
#     --manifest-path tests/rocketmq/rust/Cargo.toml
#   benches/rocketmq.sh OUT.jsonl     env: REPS=3 DURATION=10 CONC=16 MODES="send tx"
#   CLIENTS="halfmq halfmq-nobatch rust python"
# Appends one JSON line per run to OUT and prints medians per (mode, client).
set -euo pipefail
OUT=${1:?usage: benches/rocketmq.sh OUT.jsonl}
REPS=${REPS:-3}; DURATION=${DURATION:-10}; CONC=${CONC:-16}; MODES=${MODES:-"send tx"}
CLIENTS=${CLIENTS:-"halfmq halfmq-nobatch rust python"}
BIN=${BIN:-$PWD/target/release}
RMQ=${HALFMQ_ROCKETMQ_CLIENTS:-$PWD/target/rocketmq-clients}
RUST=$RMQ/rust-target/release/halfmq-rocketmq-rust-scenarios
PY="$RMQ/py/bin/python $PWD/tests/rocketmq/python/scenarios.py"
export HOME=$RMQ/home
port=18481
bp=
trap '[ -n "$bp" ] && kill $bp 2>/dev/null || true' EXIT
for rep in $(seq 1 "$REPS"); do
  for mode in $MODES; do
    for c in $CLIENTS; do
      d=$(mktemp -d /tmp/hq-rmq.XXXXXX)
      "$BIN/halfmq-broker" --data-dir "$d" --listen 127.0.0.1:$port >"$d.log" 2>&1 &
      bp=$!
      for _ in $(seq 1 100); do "$BIN/halfmq" --broker 127.0.0.1:$port topic list >/dev/null 2>&1 && break; sleep 0.1; done
      "$BIN/halfmq" --broker 127.0.0.1:$port topic create bench --queues 4 >/dev/null
      t0=$(awk '{print $14+$15}' /proc/$bp/stat)
      case $c in
        halfmq*)
          hmode=normal; [ "$mode" = tx ] && hmode=tx
          extra=(); [ "$c" = halfmq-nobatch ] && extra=(--no-auto-batch)
          line=$("$BIN/halfmq-bench" --broker 127.0.0.1:$port --mode $hmode --consumers 0 \
            --inflight "$CONC" --duration "${DURATION}s" --warmup 2s --json "${extra[@]}" 2>/dev/null | tail -1)
          r=$(echo "$line" | python3 -c 'import json,sys; j=json.load(sys.stdin); print(json.dumps({"ops_per_s": j["acked_per_s"], "p50_ms": j["ack_p50_us"] / 1000, "p99_ms": j["ack_p99_us"] / 1000, "raw": j}))')
          ;;
        rust)
          r=$("$RUST" 127.0.0.1:$port bench bench "$mode" "$DURATION" "$CONC" 1024 2>/dev/null | grep '^RESULT ' | tail -1 | cut -c8-) ;;
        python)
          r=$($PY 127.0.0.1:$port bench bench "$mode" "$DURATION" "$CONC" 1024 2>/dev/null | grep '^RESULT ' | tail -1 | cut -c8-) ;;
      esac
      t1=$(awk '{print $14+$15}' /proc/$bp/stat)
      kill $bp; wait $bp 2>/dev/null || true
      echo "{\"rep\":$rep,\"mode\":\"$mode\",\"client\":\"$c\",\"conc\":$CONC,\"secs\":$((DURATION + 2)),\"broker_cpu_ticks\":$((t1 - t0)),\"result\":$r}" | tee -a "$OUT"
      rm -rf "$d" "$d.log"
    done
  done
done
python3 - "$OUT" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = sorted({(r["mode"], r["client"]) for r in rows}, key=lambda k: (k[0], k[1]))
print(f"{'mode':5} {'client':15} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'broker CPU us/op':>17}")
for mode, client in keys:
    rs = [r for r in rows if r["mode"] == mode and r["client"] == client]
    med = lambda f: statistics.median(f(r) for r in rs)
    ops = med(lambda r: r["result"]["ops_per_s"] or 0)
    # CPU over the whole run (warm-up included), per operation of the run.
    cpu = med(lambda r: r["broker_cpu_ticks"] * 10_000 / max(1, (r["result"]["ops_per_s"] or 0) * r["secs"]))
    print(f"{mode:5} {client:15} {ops:9.0f} {med(lambda r: r['result']['p50_ms'] or 0):8.2f} "
          f"{med(lambda r: r['result']['p99_ms'] or 0):8.2f} {cpu:17.1f}")
EOF
