#!/usr/bin/env bash
# The floor: fulcrum and nginx beside a byte relay that does no HTTP work at all
# (loadtest/floor: epoll, epoll with fulcrum's batched sends and spin, io_uring), all
# single-threaded in front of the anchors' backend, under `wrk -t2 -c64`. Per case: req/s
# and CPU µs per request of the proxy, the backend and the whole machine (/proc). Rounds
# alternate the cases.
#   loadtest/floor.sh                                   (needs wrk, nginx)
#   CASES="fulcrum-t1 floor-epoll floor-epoll-touch4096" ROUNDS=3 loadtest/floor.sh
# Cases: fulcrum-t1, nginx-w1, haproxy-t1, floor-epoll, floor-epoll-batch, floor-uring, and
# any floor case with -touchBYTES (each forwarded message also touches BYTES of its
# connection's memory), started by lib.sh's start_proxy; loadtest/ab.sh takes the same
# floor cases (floor-uring=- and so on).
source "$(dirname "$0")/lib.sh"
CASES=${CASES:-nginx-w1 fulcrum-t1 floor-epoll floor-uring}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-6}
build
cargo build --release --locked --manifest-path "$ROOT/loadtest/floor/Cargo.toml" >&2
start_backends
BACKEND_PID=${PIDS[0]}

machine_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
tick_us=$((1000000 / $(getconf CLK_TCK)))

printf '%-24s %6s %9s %10s %10s %10s\n' case round req/s proxy_us backend_us machine_us
for round in $(seq "$ROUNDS"); do
    for c in $CASES; do
        start_proxy "$c"
        wrk -t2 -c64 -d1s "$CASE_URL" >/dev/null
        p0=$(cpu_ticks "$CASE_PID"); b0=$(cpu_ticks "$BACKEND_PID"); m0=$(machine_ticks)
        wrk -t2 -c64 -d"${DURATION}"s "$CASE_URL" > "$OUT/wrk.txt"
        p1=$(cpu_ticks "$CASE_PID"); b1=$(cpu_ticks "$BACKEND_PID"); m1=$(machine_ticks)
        n=$(awk '/requests in/ {print $1}' "$OUT/wrk.txt")
        rps=$(awk '/Requests\/sec/ {print $2}' "$OUT/wrk.txt")
        if grep -q -E 'Non-2xx|Socket errors' "$OUT/wrk.txt"; then
            echo "$c: errors:" >&2; grep -E 'Non-2xx|Socket errors' "$OUT/wrk.txt" >&2
        fi
        awk -v c="$c" -v r="$round" -v rps="$rps" -v n="$n" -v t="$tick_us" \
            -v p=$((p1 - p0)) -v b=$((b1 - b0)) -v m=$((m1 - m0)) \
            'BEGIN { printf "%-24s %6d %9.0f %10.2f %10.2f %10.2f\n", c, r, rps, p*t/n, b*t/n, m*t/n }'
        stop_proxy
    done
done
