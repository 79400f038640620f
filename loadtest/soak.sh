#!/usr/bin/env bash
# Soak: steady load through fulcrum for SOAK seconds (default 600), RSS and open descriptors
# sampled every INTERVAL seconds; prints the samples and the growth from the first sample
# after warm-up to the last. Loopback only.
#   loadtest/soak.sh                       # 10 minutes, oha -c 64 at RATE req/s
#   SOAK=120 RATE=20000 loadtest/soak.sh
source "$(dirname "$0")/lib.sh"
SOAK=${SOAK:-600}
INTERVAL=${INTERVAL:-30}
RATE=${RATE:-30000}
CASE=${CASE:-fulcrum-t2}
build
start_backends
start_proxy "$CASE"
timeout -k 5 $((SOAK + 60)) oha -z "${SOAK}s" -c 64 -q "$RATE" --no-tui --output-format json \
    "$CASE_URL" > "$OUT/oha.json" 2> "$OUT/oha.err" &
LOAD=$!; PIDS+=("$LOAD")
printf '%8s %10s %8s %10s\n' t_s rss_MiB fds requests
t0=$(date +%s)
first=""
while kill -0 "$LOAD" 2>/dev/null; do
    sleep "$INTERVAL"
    kill -0 "$LOAD" 2>/dev/null || break
    t=$(( $(date +%s) - t0 ))
    rss=$(rss_kib "$CASE_PID")
    fds=$(ls /proc/"$CASE_PID"/fd 2>/dev/null | wc -l)
    reqs=$(curl -s http://127.0.0.1:9099/metrics | awk '/^fulcrum_requests_total/ {s += $NF} END {printf "%d", s}')
    printf '%8d %10.1f %8d %10s\n' "$t" "$(awk -v r="$rss" "BEGIN { print r / 1024 }")" "$fds" "$reqs"
    # the first sample after one minute is the baseline (pools and arenas are warm by then)
    [[ -z "$first" && $t -ge 60 ]] && first=$rss
    last=$rss
done
wait "$LOAD" || true
jq -r '"oha: \(.summary.requestsPerSec | floor) req/s, success rate \(.summary.successRate), p99 \(.latencyPercentiles.p99 * 1000 * 1000 | round / 1000) ms"' "$OUT/oha.json"
if [[ -n "$first" ]]; then
    awk -v a="$first" -v b="$last" 'BEGIN { printf "RSS growth after warm-up: %+.1f MiB (%.1f -> %.1f MiB)\n", (b - a) / 1024, a / 1024, b / 1024 }'
fi
