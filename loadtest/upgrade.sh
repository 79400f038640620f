#!/usr/bin/env bash
# Binary upgrade under load: oha -z ${DURATION}s -c 64 through fulcrum while, at 10 s,
# `fulcrum upgrade` takes the sockets over. Prints failed requests (target 0) and the time
# from `fulcrum upgrade` to the old process's exit.
#   loadtest/upgrade.sh
source "$(dirname "$0")/lib.sh"
DURATION=${DURATION:-30}
build
for i in 1 2; do start "backend$i" "$FULCRUM" backend --listen "127.0.0.1:980$i" --name "b$i"; done
cat > "$OUT/fulcrum.toml" <<CONF
[server]
drain_timeout = "10s"
upgrade_socket = "$OUT/upgrade.sock"
[admin]
listen = "127.0.0.1:9895"
[[listeners]]
name = "http"
listen = "127.0.0.1:9880"
[[routes]]
pool = "p"
[pools.p]
backends = [{ address = "127.0.0.1:9801" }, { address = "127.0.0.1:9802" }]
CONF
start old env RUST_LOG=info "$FULCRUM" -c "$OUT/fulcrum.toml"; OLD=$LAST_PID
wait_http http://127.0.0.1:9880/
oha -z "${DURATION}s" -c 64 --no-tui --output-format json http://127.0.0.1:9880/ > "$OUT/oha.json" &
OHA=$!
sleep 10
t0=$(now_ms)
start new env RUST_LOG=info "$FULCRUM" upgrade -c "$OUT/fulcrum.toml"
while kill -0 "$OLD" 2>/dev/null; do sleep 0.005; done
t1=$(now_ms)
wait "$OHA" || true
jq -r '"requests: \([.statusCodeDistribution | to_entries[] | .value] | add), non-200: \([.statusCodeDistribution | to_entries[] | select(.key != "200") | .value] | add // 0), errors: \(.errorDistribution | tostring), req/s: \(.summary.requestsPerSec | floor)"' "$OUT/oha.json"
echo "fulcrum upgrade -> old process exit: $((t1 - t0)) ms"
