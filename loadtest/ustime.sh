#!/usr/bin/env bash
# User and system CPU a request, each case in turn, ROUNDS rounds: the proxy's process tree's
# utime and stime (/proc/PID/stat, 10 ms ticks) across `oha -z ${D}s -c 64` after a 2 s wrk
# warm-up, divided by the requests oha counted. Where ab.sh says how much CPU a request takes,
# this says whether it is the proxy's own code (user) or the kernel's (system: the TCP path,
# including the receivers' input run on the sender's CPU over loopback, and the spin's polls).
#   CASES="new=target/release/fulcrum old=/tmp/fulcrum-old nginx-w2=-" loadtest/ustime.sh
# A case is NAME=BINARY (fulcrum with two workers) or an anchor by name with "=-" (nginx-wN,
# haproxy-tN). Loopback only; stops everything it started.
source "$(dirname "$0")/lib.sh"
CASES=${CASES:-"fulcrum=$ROOT/target/release/fulcrum nginx-w2=- haproxy-t2=-"}
ROUNDS=${ROUNDS:-3}
D=${D:-6}
command -v oha >/dev/null || { echo "needs oha (../shared/bench/install.sh)" >&2; exit 1; }
start_backends

# ticks PID: "utime stime" of PID and its children, in clock ticks
ticks() {
    local p u=0 s=0 f
    for p in $(proc_tree "$1"); do
        f=($(awk '{print $14, $15}' /proc/"$p"/stat 2>/dev/null || echo 0 0))
        u=$((u + f[0])); s=$((s + f[1]))
    done
    echo "$u $s"
}

hz=$(getconf CLK_TCK)
printf '%-12s %9s %10s %10s %10s\n' case requests user_us sys_us total_us
for r in $(seq "$ROUNDS"); do
    for spec in $CASES; do
        name=${spec%%=*} bin=${spec#*=}
        if [[ $bin == - ]]; then start_proxy "$name"; else FULCRUM=$bin start_proxy fulcrum-t2; fi
        wrk -t2 -c64 -d2s "$CASE_URL" >/dev/null
        read -r u0 s0 < <(ticks "$CASE_PID")
        oha -z "${D}s" -c 64 --no-tui --output-format json "$CASE_URL" > "$OUT/oha.json" 2>/dev/null
        read -r u1 s1 < <(ticks "$CASE_PID")
        n=$(python3 -c "import json; print(sum(json.load(open('$OUT/oha.json'))['statusCodeDistribution'].values()))")
        awk -v c="$name" -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$hz" 'BEGIN {
            us = 1e6 / hz / n; printf "%-12s %9d %10.2f %10.2f %10.2f\n", c, n, u * us, s * us, (u + s) * us }'
        stop_proxy
    done
done
