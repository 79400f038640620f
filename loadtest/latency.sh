#!/usr/bin/env bash
# Latency at a fixed offered load: oha -q at half of HAProxy's peak, the same rate for every
# proxy, in one run. Prints p50/p99/p99.9 (with oha's coordinated-omission correction) for
# each of REPS rounds (default 3; the cases take turns) and the median per case: the tails on
# this box swing by several times from one run to the next, for every proxy.
#   loadtest/latency.sh                      # fulcrum-t2, haproxy-t2, nginx-w2
#   CASES="fulcrum-t1 haproxy-t1" DURATION=20 loadtest/latency.sh
# Needs ../shared/bench/install.sh once (oha, nginx, haproxy). Loopback only.
source "$(dirname "$0")/lib.sh"
CASES=${CASES:-"fulcrum-t2 haproxy-t2 nginx-w2"}
DURATION=${DURATION:-15}
CONNS=${CONNS:-64}
REPS=${REPS:-3}
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
read -ra LIST <<< "$CASES"
for r in $(seq "$REPS"); do
  # Each round starts with a different case (no case is always the one after the peak run).
  ORDER=("${LIST[@]:$(( (r - 1) % ${#LIST[@]} ))}" "${LIST[@]:0:$(( (r - 1) % ${#LIST[@]} ))}")
  for c in "${ORDER[@]}"; do
    start_proxy "$c"
    oha -z 2s -c "$CONNS" --no-tui --output-format quiet "$CASE_URL" || true   # warm pools
    t0=$(cpu_ticks "$CASE_PID")
    timeout -k 5 $((DURATION + 30)) oha -z "${DURATION}s" -c "$CONNS" -q "$RATE" \
        --latency-correction --no-tui --output-format json "$CASE_URL" > "$OUT/$c.$r.json"
    t1=$(cpu_ticks "$CASE_PID")
    stop_proxy
    jq -r --arg c "$c" --arg rate "$RATE" \
        --arg cpu "$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v s="$DURATION" 'BEGIN { printf "%.0f", d / hz / s * 100 }')" \
        '[$c, $rate, (.summary.requestsPerSec | floor),
          (.latencyPercentiles.p50 * 1000 * 1000 | round / 1000),
          (.latencyPercentiles.p99 * 1000 * 1000 | round / 1000),
          (.latencyPercentiles["p99.9"] * 1000 * 1000 | round / 1000), $cpu] | @tsv' \
        "$OUT/$c.$r.json" | awk -F'\t' '{printf "%-12s %8s %8s %9s %9s %9s %6s\n", $1, $2, $3, $4, $5, $6, $7}' \
        | tee -a "$OUT/rows.txt"
  done
done
if [[ $REPS -gt 1 ]]; then
    echo
    echo "median over $REPS runs (the cases take turns, so a slow minute of the machine hits each)"
    printf '%-12s %9s %9s %9s   %s\n' case p50_ms p99_ms p99.9_ms "p99 of each run"
    for c in $CASES; do
        awk -v c="$c" '$1 == c {p50[++n] = $4; p99[n] = $5; p999[n] = $6}
            function med(a, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
                return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
            END { runs = ""; for (i = 1; i <= n; i++) runs = runs " " p99[i]
                  printf "%-12s %9.3f %9.3f %9.3f  %s\n", c, med(p50, n), med(p99, n), med(p999, n), runs }' "$OUT/rows.txt"
    done
    # Paired: the cases of one round share the machine's minute, so compare within rounds.
    first=${LIST[0]}
    awk -v n="${#LIST[@]}" -v first="$first" '
        { r = int((NR - 1) / n); p99[r, $1] = $5; seen[$1] = 1; rounds = r + 1 }
        END { line = "round by round, rounds where " first "'"'"'s p99 is at or below:"
              for (c in seen) if (c != first) { k = 0
                  for (r = 0; r < rounds; r++) k += (p99[r, first] <= p99[r, c])
                  line = line sprintf(" %s %d of %d;", c, k, rounds) }
              print line }' "$OUT/rows.txt"
fi
