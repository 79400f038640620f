#!/usr/bin/env bash
# Memory with 10,000 idle keep-alive client connections (each has made one request), fulcrum
# beside nginx and HAProxy: RSS before, with the connections open, and per connection.
#   loadtest/idle.sh                      # fulcrum-t2 nginx-w2 haproxy-t2, 10,000 connections
#   IDLE=5000 CASES="fulcrum-t1 nginx-w1" REPS=1 loadtest/idle.sh
# Each case runs REPS times (default 3; the allocators' resident sizes vary by a few MiB from
# run to run) and the median per connection is printed last.
# The sandbox caps every process at 20,000 open files, so 10,000 is about the most a proxy can
# hold here (plus its listeners and upstream connections). Loopback only.
source "$(dirname "$0")/lib.sh"
CASES=${CASES:-"fulcrum-t2 nginx-w2 haproxy-t2"}
IDLE=${IDLE:-10000}
SETTLE=${SETTLE:-6}
REPS=${REPS:-3}
build
start_backends
printf '%-12s %8s %8s %12s %12s %14s\n' case opened ok rss_idle_MiB rss_open_MiB KiB_per_conn
for c in $CASES; do
  for r in $(seq "$REPS"); do
    start_proxy "$c"
    if [[ $c == haproxy-* ]]; then
        # The anchors' HAProxy caps connections at 4,096: lift the cap for this scenario, as far
        # as the 20,000 open files allow (HAProxy reserves two per connection: 9,980).
        stop_proxy
        hmax=$((IDLE + 100 > 9980 ? 9980 : IDLE + 100))
        sed -i "s|maxconn 4096|maxconn $hmax|" "$OUT/$c/haproxy.cfg"
        start "$c" haproxy -db -f "$OUT/$c/haproxy.cfg"; CASE_PID=$LAST_PID
        wait_http "$CASE_URL"
    fi
    # Warm up (upstream pools, allocator arenas), as a serving proxy would be.
    oha -z 2s -c 64 --no-tui --output-format quiet "$CASE_URL" || true
    # Settle: fulcrum summarises its histograms every 5 s (what the warm-up left is freed then).
    sleep "$SETTLE"
    before=$(rss_kib "$CASE_PID")
    port=${CASE_URL##*:}; port=${port%/}
    fifo="$OUT/$c.$r.hold"; mkfifo "$fifo"
    python3 "$ROOT/loadtest/idle_clients.py" 127.0.0.1 "$port" "$IDLE" < "$fifo" > "$OUT/$c.$r.clients" 2>&1 &
    CLIENTS=$!; PIDS+=("$CLIENTS")
    exec 9> "$fifo"                     # holds the clients' stdin open
    for _ in $(seq 600); do [[ -s "$OUT/$c.$r.clients" ]] && break; sleep 0.1; done
    # Idle for a while, as idle connections are: fulcrum parks a connection idle for 1 s
    # (`idle_park_after`) and returns the memory its task held 2 s after the last one parked.
    sleep "$SETTLE"
    after=$(rss_kib "$CASE_PID")
    read -r _ opened _ ok < "$OUT/$c.$r.clients" || { opened=0; ok=0; }
    exec 9>&-                           # the clients close everything and exit
    wait "$CLIENTS" 2>/dev/null || true
    stop_proxy
    awk -v c="$c" -v o="$opened" -v k="$ok" -v b="$before" -v a="$after" 'BEGIN {
        printf "%-12s %8d %8d %12.1f %12.1f %14.2f\n", c, o, k, b / 1024, a / 1024, (o ? (a - b) / o : 0) }' | tee -a "$OUT/idle.tsv"
  done
done
printf '\nmedian KiB per connection over %d runs\n' "$REPS"
for c in $CASES; do
    runs=$(awk -v c="$c" '$1 == c { print $6 }' "$OUT/idle.tsv" | sort -n)
    n=$(echo "$runs" | grep -c .)
    [[ $n -gt 0 ]] || continue
    printf '%-12s %6s   (runs: %s)\n' "$c" "$(echo "$runs" | sed -n "$(((n + 1) / 2))p")" "$(echo $runs)"
done
