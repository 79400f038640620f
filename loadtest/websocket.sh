#!/usr/bin/env bash
# WebSocket figures: fulcrum's RSS per open idle session (SESSIONS, default 9,000) and the
# echo round-trip p50/p99 through fulcrum versus straight to the backend.
#   loadtest/websocket.sh
source "$(dirname "$0")/lib.sh"
SESSIONS=${SESSIONS:-9000}   # fulcrum needs 2 descriptors per session; this sandbox caps a process at 20,000
build
cargo build --release --locked --example ws_load --manifest-path "$ROOT/Cargo.toml" >&2
WS=$ROOT/target/release/examples/ws_load
ulimit -n 200000 2>/dev/null || true
start backend "$WS" backend --listen 127.0.0.1:9501
cat > "$OUT/fulcrum.toml" <<CONF
[admin]
listen = "127.0.0.1:9515"
[[listeners]]
name = "http"
listen = "127.0.0.1:9510"
[[routes]]
pool = "ws"
[pools.ws]
backends = [{ address = "127.0.0.1:9501" }]
health_check = { type = "tcp" }
CONF
start fulcrum env RUST_LOG=warn "$FULCRUM" -c "$OUT/fulcrum.toml"
FPID=$LAST_PID
wait_http http://127.0.0.1:9515/ready
sleep 0.5
before=$(rss_kib "$FPID")
log "holding $SESSIONS sessions through fulcrum"
"$WS" hold --url ws://127.0.0.1:9510/ --sessions "$SESSIONS" --seconds 5 > "$OUT/hold.txt" &
HOLD=$!
# read RSS while they are held (after they are all open)
for _ in $(seq 600); do grep -q '^open' "$OUT/hold.txt" 2>/dev/null && break; sleep 0.1; done
sleep 2
during=$(rss_kib "$FPID")
sessions=$(curl -s http://127.0.0.1:9515/status | jq '[.pools[].backends[].sessions] | add')
wait "$HOLD"
cat "$OUT/hold.txt"
direct=$("$WS" rtt --url ws://127.0.0.1:9501/ --count 20000)
through=$("$WS" rtt --url ws://127.0.0.1:9510/ --count 20000)
echo "fulcrum RSS: ${before} KiB idle, ${during} KiB with ${sessions} open sessions -> $(( (during - before) * 1024 / SESSIONS )) bytes per session"
echo "echo round trip direct:  $direct"
echo "echo round trip fulcrum: $through"
