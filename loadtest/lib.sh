# Shared helpers for loadtest/*.sh: start processes, remember their PIDs, stop them all on
# exit (by PID, never by name). Loopback only.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FULCRUM=$ROOT/target/release/fulcrum
OUT=${OUT:-$(mktemp -d /tmp/fulcrum-loadtest.XXXXXX)}
PIDS=()

build() { cargo build --release --locked --manifest-path "$ROOT/Cargo.toml" >&2; }

# start NAME CMD...: run in the background, log to $OUT/NAME.log; sets LAST_PID
start() {
    local name=$1; shift
    "$@" >"$OUT/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_http URL [TIMEOUT_S]: until URL answers 200
wait_http() {
    local i
    for i in $(seq $(( ${2:-10} * 20 ))); do
        [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1" || true)" == 200 ]] && return 0
        sleep 0.05
    done
    echo "not ready: $1" >&2; return 1
}

now_ms() { date +%s%3N; }
log() { printf '[%s] %s\n' "$(date +%T.%3N)" "$*" >&2; }
