#!/usr/bin/env bash
# Screenshot of the dashboard under load: runs `fulcrum demo`, loads it with oha for a few
# seconds, and has headless Chromium save the admin page to $OUT/dashboard.png.
#   loadtest/dashboard.sh [OUTPUT.png]
source "$(dirname "$0")/lib.sh"
PNG=${1:-$OUT/dashboard.png}
build
start demo env RUST_LOG=warn "$FULCRUM" demo
wait_http http://127.0.0.1:8080/
oha -z 12s -c 16 -q 3000 --no-tui http://127.0.0.1:8080/ > "$OUT/oha.txt" 2>&1 &
OHA=$!
sleep 7
# one backend out of rotation, to show the states
curl -s -X DELETE http://127.0.0.1:9090/pools/demo/backends/127.0.0.1:9203 > /dev/null
sleep 1
PROFILE=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$PROFILE" --hide-scrollbars --window-size=1400,760 \
    --virtual-time-budget=6000 --screenshot="$PNG" http://127.0.0.1:9090/ 2>/dev/null
rm -rf "$PROFILE"
wait "$OHA" || true
echo "dashboard screenshot: $PNG"
