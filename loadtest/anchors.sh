#!/usr/bin/env bash
# Runs ../shared/bench/anchors.sh with fulcrum beside direct, nginx and HAProxy, in one run.
#   loadtest/anchors.sh                       # defaults of anchors.sh (2 reps, wrk + oha)
#   FULCRUM_THREADS=1 loadtest/anchors.sh     # fulcrum with one worker thread
#   REPS=3 CASES="direct haproxy-t2" loadtest/anchors.sh
#   FULCRUM_HEADERS=on loadtest/anchors.sh    # with fulcrum's default X-Forwarded-*/X-Request-Id
#   FULCRUM=target/pgo/release/fulcrum loadtest/anchors.sh   # the PGO build (loadtest/pgo.sh)
# Needs ../shared/bench/install.sh once (wrk, oha, nginx, haproxy). Loopback only.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=${BENCH:-$ROOT/../shared/bench}
THREADS=${FULCRUM_THREADS:-2}
FULCRUM=${FULCRUM:-}
if [[ -z $FULCRUM ]]; then
    cargo build --release --locked --manifest-path "$ROOT/Cargo.toml" >&2
    FULCRUM=$ROOT/target/release/fulcrum
fi
FULCRUM=$(realpath "$FULCRUM")
CONF=$(mktemp /tmp/fulcrum-anchors.XXXXXX.toml)
trap 'rm -f "$CONF"' EXIT
# the [server] table comes first in the file, so the line lands inside it
sed "s|^# worker_threads is set.*|worker_threads = $THREADS|" "$ROOT/loadtest/anchors.toml" > "$CONF"
NAME=fulcrum-t$THREADS
if [[ ${FULCRUM_HEADERS:-off} == on ]]; then
    sed -i '/^forwarded_headers = false$/d; /^request_id = false$/d' "$CONF"
    NAME=$NAME-hdr
fi
[[ $FULCRUM == */pgo/* ]] && NAME=${NAME/fulcrum/fulcrum-pgo}
export PROXY_CMD="env RUST_LOG=warn $FULCRUM -c $CONF"
export PROXY_URL=http://127.0.0.1:8080/
export PROXY_NAME=${PROXY_NAME:-$NAME}
exec "$BENCH/anchors.sh"
