#!/usr/bin/env bash
# Latency at a fixed offered load: oha -q at half of HAProxy's peak, the same rate for every
# proxy, in one run. Prints p50/p99/p99.9 (with oha's coordinated-omission correction).
#   loadtest/latency.sh                      # fulcrum-t2, haproxy-t2, nginx-w2
#   CASES="fulcrum-t1 haproxy-t1" DURATION=20 loadtest/latency.sh
# Needs ../shared/bench/install.sh once (oha, nginx, haproxy). Loopback only.
source "$(dirname "$0")/lib.sh"
CASES=${CASES:-"fulcrum-t2 haproxy-t2 nginx-w2"}
DURATION=${DURATION:-15}
CONNS=${CONNS:-64}
build
start_backends
# The rate: half of what HAProxy (with the first case's thread count) sustains at peak.
threads=$(echo "$CASES" | grep -o 't[0-9]*' | head -1 | tr -d t); threads=${threads:-2}
start_proxy "haproxy-t$threads"
oha -z 5s -c "$CONNS" --no-tui --output-format json "$CASE_URL" > "$OUT/peak.json"
stop_proxy
peak=$(jq '.summary.requestsPerSec | floor' "$OUT/peak.json")
RATE=${RATE:-$((peak / 2))}
log "haproxy-t$threads peak $peak req/s: offering $RATE req/s to every case"
printf '%-12s %8s %8s %9s %9s %9s %6s\n' case rate req/s p50_ms p99_ms p99.9_ms cpu%
for c in $CASES; do
    start_proxy "$c"
    oha -z 2s -c "$CONNS" --no-tui --output-format quiet "$CASE_URL" || true   # warm pools
    t0=$(cpu_ticks "$CASE_PID")
    timeout -k 5 $((DURATION + 30)) oha -z "${DURATION}s" -c "$CONNS" -q "$RATE" \
        --latency-correction --no-tui --output-format json "$CASE_URL" > "$OUT/$c.json"
    t1=$(cpu_ticks "$CASE_PID")
    stop_proxy
    jq -r --arg c "$c" --arg rate "$RATE" \
        --arg cpu "$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v s="$DURATION" 'BEGIN { printf "%.0f", d / hz / s * 100 }')" \
        '[$c, $rate, (.summary.requestsPerSec | floor),
          (.latencyPercentiles.p50 * 1000 * 1000 | round / 1000),
          (.latencyPercentiles.p99 * 1000 * 1000 | round / 1000),
          (.latencyPercentiles["p99.9"] * 1000 * 1000 | round / 1000), $cpu] | @tsv' \
        "$OUT/$c.json" | awk -F'\t' '{printf "%-12s %8s %8s %9s %9s %9s %6s\n", $1, $2, $3, $4, $5, $6, $7}'
done
