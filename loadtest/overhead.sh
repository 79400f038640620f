#!/usr/bin/env bash
# What features cost on the hot path: the same oha load (-z ${DURATION}s -c 64) through
# fulcrum configured plain, with the JSON access log on, and with a rate limit that is never
# hit; interleaved over REPS repetitions. Prints req/s and p99 per variant.
#   loadtest/overhead.sh
source "$(dirname "$0")/lib.sh"
DURATION=${DURATION:-10}
REPS=${REPS:-2}
build
for i in 1 2; do start "backend$i" "$FULCRUM" backend --listen "127.0.0.1:950$i" --name "b$i"; done
base() {
cat <<CONF
[admin]
listen = "127.0.0.1:9595"
$1
[[listeners]]
name = "http"
listen = "127.0.0.1:9590"
[[routes]]
pool = "p"
$2
[pools.p]
backends = [{ address = "127.0.0.1:9501" }, { address = "127.0.0.1:9502" }]
CONF
}
base "" "" > "$OUT/plain.toml"
base "[access_log]
path = \"$OUT/access.log\"
format = \"json\"" "" > "$OUT/access_log.toml"
base "" "rate_limit = { per_second = 10000000, burst = 10000000 }" > "$OUT/rate_limit.toml"
printf 'rep\tvariant\treq/s\tp99_ms\n' > "$OUT/results.tsv"
for rep in $(seq "$REPS"); do
    for v in plain access_log rate_limit; do
        start "fulcrum-$v" env RUST_LOG=warn "$FULCRUM" -c "$OUT/$v.toml"
        pid=$LAST_PID
        wait_http http://127.0.0.1:9590/
        oha -z "${DURATION}s" -c 64 --no-tui --output-format json http://127.0.0.1:9590/ > "$OUT/$v.json"
        jq -r --arg rep "$rep" --arg v "$v" '[$rep, $v, (.summary.requestsPerSec|floor), (.latencyPercentiles.p99*1000*1000|floor/1000)] | @tsv' "$OUT/$v.json" >> "$OUT/results.tsv"
        kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
        log "rep $rep $v done"
    done
done
column -t "$OUT/results.tsv"
echo "access log lines written: $(wc -l < "$OUT/access.log")"
