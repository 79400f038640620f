#!/usr/bin/env bash
# Kill one of four backends under load and bring it back:
#   oha -z 20s -c 50 through fulcrum; at 5 s backend 2 is killed (SIGKILL), at 12 s restarted.
# Prints the time from its death to fulcrum taking it out of rotation (passive detection),
# the time from its restart to its return (2 active checks at 1 s), and the errors clients saw.
#   loadtest/failover.sh            (needs oha, curl, jq: ../shared/bench/install.sh)
source "$(dirname "$0")/lib.sh"
DURATION=${DURATION:-20}
build
for i in 1 2 3 4; do
    start "backend$i" "$FULCRUM" backend --listen "127.0.0.1:930$i" --name "b$i"
    eval "B$i=$LAST_PID"
done
cat > "$OUT/fulcrum.toml" <<CONF
[admin]
listen = "127.0.0.1:9395"
[[listeners]]
name = "http"
listen = "127.0.0.1:9390"
[[routes]]
pool = "p"
[pools.p]
algorithm = "round_robin"
backends = [{ address = "127.0.0.1:9301" }, { address = "127.0.0.1:9302" },
            { address = "127.0.0.1:9303" }, { address = "127.0.0.1:9304" }]
health_check = { interval = "1s", timeout = "500ms" }
CONF
start fulcrum env RUST_LOG=info "$FULCRUM" -c "$OUT/fulcrum.toml"
wait_http http://127.0.0.1:9390/
backend_field() { curl -s http://127.0.0.1:9395/status | jq -r ".pools[0].backends[] | select(.address == \"127.0.0.1:9302\") | .$1"; }

log "oha -z ${DURATION}s -c 50 through fulcrum (output in $OUT)"
oha -z "${DURATION}s" -c 50 --no-tui --output-format json http://127.0.0.1:9390/ > "$OUT/oha.json" &
OHA=$!
sleep 5
before=$(backend_field requests)
kill -KILL "$B2"; t_kill=$(now_ms); log "backend 2 killed"
while [[ "$(backend_field healthy)" == true ]]; do sleep 0.005; done
t_out=$(now_ms); failed=$(backend_field failures)
log "backend 2 out of rotation after $((t_out - t_kill)) ms ($failed failed attempts on it)"
sleep $((12 - 5 - (t_out - t_kill) / 1000))
start backend2b "$FULCRUM" backend --listen 127.0.0.1:9302 --name b2; t_up=$(now_ms)
log "backend 2 restarted"
while [[ "$(backend_field healthy)" != true ]]; do sleep 0.01; done
t_back=$(now_ms)
log "backend 2 back in rotation $((t_back - t_up)) ms after restart"
wait "$OHA" || true
jq -r '"requests: \(.summary.successRate * 100 | floor)% success, " +
       "\([.statusCodeDistribution | to_entries[] | "\(.key)=\(.value)"] | join(" ")), " +
       "errors: \(.errorDistribution | tostring), req/s: \(.summary.requestsPerSec | floor), " +
       "p99: \(.latencyPercentiles.p99 * 1000 * 1000 | floor / 1000) ms"' "$OUT/oha.json"
printf 'death -> out of rotation: %d ms (%s failed attempts)\nrestart -> back in rotation: %d ms\n' \
    "$((t_out - t_kill))" "$failed" "$((t_back - t_up))"
