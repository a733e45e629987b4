#!/usr/bin/env bash
# Interleaved runs of halfmq-bench against a separate halfmq-broker process (sync flush, fresh
# data dir per run), with security off and on: "off" (today's default), "auth" (--auth: every
# request signed and authorized), "tls" (--tls-cert/--tls-key) and "auth+tls". Each repetition
# runs every variant once, in turn, for each mode (normal sends, then transactions), so drift
# and steal hit all alike. Certificates are made with openssl into a temp dir.
# Run from the project root after `cargo build --release`:
#   benches/security.sh OUT.jsonl        env: REPS=3 DURATION=10 WARMUP=3 MODES="normal tx"
#   VARIANTS="off auth tls auth+tls"
# Appends one JSON line per run to OUT and prints medians per (mode, variant) with the ratio
# to "off" of the same mode.
set -euo pipefail
OUT=${1:?usage: benches/security.sh OUT.jsonl}
REPS=${REPS:-3}; DURATION=${DURATION:-10}; WARMUP=${WARMUP:-3}; MODES=${MODES:-"normal tx"}
BIN=${BIN:-$PWD/target/release}
port=18381
pki=$(mktemp -d /tmp/hq-pki.XXXXXX)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=bench-ca \
  -keyout "$pki/ca.key" -out "$pki/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
  -keyout "$pki/key.pem" -out "$pki/req.pem" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$pki/ext"
openssl x509 -req -in "$pki/req.pem" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" -CAcreateserial -days 2 \
  -extfile "$pki/ext" -out "$pki/cert.pem" 2>/dev/null
export HALFMQ_ADMIN_SECRET=bench-admin-secret-0123456789
for rep in $(seq 1 "$REPS"); do
  for mode in $MODES; do
    for v in ${VARIANTS:-off auth tls auth+tls}; do
      d=$(mktemp -d /tmp/hq-sec.XXXXXX)
      bargs=(); cargs=(); unset HALFMQ_USER HALFMQ_SECRET
      case $v in *auth*) bargs+=(--auth) ;; esac
      case $v in *tls*) bargs+=(--tls-cert "$pki/cert.pem" --tls-key "$pki/key.pem"); cargs+=(--tls-ca "$pki/ca.pem") ;; esac
      "$BIN/halfmq-broker" --data-dir "$d" --listen 127.0.0.1:$port "${bargs[@]}" >"$d.log" 2>&1 &
      bp=$!
      admin=("$BIN/halfmq" --broker 127.0.0.1:$port "${cargs[@]}")
      case $v in *auth*) admin+=(--user admin) ;; esac
      for _ in $(seq 1 100); do HALFMQ_SECRET=$HALFMQ_ADMIN_SECRET "${admin[@]}" topic list >/dev/null 2>&1 && break; sleep 0.1; done
      case $v in *auth*)
        secret=$(HALFMQ_SECRET=$HALFMQ_ADMIN_SECRET "${admin[@]}" user create bench --json | jq -r .secret)
        for g in "--topic bench --actions pub,sub,admin" "--group bench-* --actions sub" "--producer-group bench-pg --actions tx"; do
          # shellcheck disable=SC2086
          HALFMQ_SECRET=$HALFMQ_ADMIN_SECRET "${admin[@]}" acl grant bench $g >/dev/null
        done
        export HALFMQ_USER=bench HALFMQ_SECRET=$secret ;;
      esac
      ticks() { awk '{print $14 + $15}' "/proc/$bp/stat"; }
      t0=$(ticks)
      line=$(timeout 300 "$BIN/halfmq-bench" --broker 127.0.0.1:$port "${cargs[@]}" --mode "$mode" --duration "${DURATION}s" --warmup "${WARMUP}s" --json 2>/dev/null | grep '^{' | tail -1) || true
      t1=$(ticks)
      kill -TERM $bp; wait $bp 2>/dev/null || true
      rm -rf "$d" "$d.log"
      [ -n "$line" ] && echo "$line" | jq -c --arg v "$v" --arg m "$mode" --arg r "rep$rep" --argjson tk $((t1 - t0)) --argjson hz "$(getconf CLK_TCK)" '{variant:$v, mode:$m, rep:$r, published_per_s:.acked_per_s, broker_cpu_us_per_msg:(($tk * 1000000 / $hz) / ([.acked_total, 1] | max) * 10 | round / 10), p50:.e2e_p50_us, p99:.e2e_p99_us, lost, duplicates, steal_pct}' >>"$OUT"
      tail -1 "$OUT" >&2 || true
      sleep 2
    done
  done
done
rm -rf "$pki"
echo "| mode | variant | runs | acked/s (median) | vs off | e2e p50 us | e2e p99 us | broker CPU us/msg | lost |"
echo "|---|---|---|---|---|---|---|---|---|"
jq -s -r '(group_by(.mode) | map({key: .[0].mode, value: (map(select(.variant == "off")) | map(.published_per_s) | sort | .[length/2|floor])}) | from_entries) as $off
  | group_by(.mode + " " + .variant)[] | {m: .[0].mode, v: .[0].variant, n: length, pub: (map(.published_per_s)|sort|.[length/2|floor]), p50: (map(.p50)|sort|.[length/2|floor]), p99: (map(.p99)|sort|.[length/2|floor]), cpu: (map(.broker_cpu_us_per_msg)|sort|.[length/2|floor]), lost: (map(.lost)|add)}
  | "| \(.m) | \(.v) | \(.n) | \(.pub|round) | \((.pub / $off[.m] * 100 | round) / 100)x | \(.p50) | \(.p99) | \(.cpu) | \(.lost) |"' "$OUT"
