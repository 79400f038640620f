#!/usr/bin/env bash
# Where each proxy's CPU goes, frame by frame, in µs a request: every case (fulcrum builds or
# settings, the anchors, loadtest/floor's relays; named as in ab.sh) is started in turn on the
# anchors' backends, loaded with `oha -c 64`, and sampled for S seconds from 2 s in
# (`perf record -F F -p PID`, no call graphs); each frame's share of the samples times the
# case's CPU a request in that window (the scheduler's clock, lib.sh's cpu_ns; requests are
# the machine's TCP segments out / 4). Prints the top frames of the first case beside the
# others' cost of the same frames, then each case's kernel / own code / libc / vDSO split.
# The sampling adds to the profiled process's CPU (by how much is not measured here); compare
# cases within one run.
#   loadtest/profile.sh
#   CASES="fulcrum=target/release/fulcrum floor-epoll-batch-t2=- nginx-w2=-" loadtest/profile.sh
#   TOP=40 S=5 F=2999 D=9 loadtest/profile.sh
# Needs perf (Debian linux-perf), oha, nginx, HAProxy (../shared/bench/install.sh). Loopback
# only; everything started is stopped by PID.
source "$(dirname "$0")/lib.sh"
CASES=${CASES:-fulcrum-t2 nginx-w2 haproxy-t2}
S=${S:-4}; F=${F:-999}; D=${D:-8}; TOP=${TOP:-25}
(( D >= S + 3 )) || { echo "D must be at least S + 3" >&2; exit 2; }
command -v perf > /dev/null || { echo "needs perf (apt-get install linux-perf)" >&2; exit 2; }
build
start_backends
names=()
for spec in $CASES; do
    start_case "$spec"
    names+=("$CASE_NAME")
    oha -z 2s -c 64 --no-tui "$CASE_URL" > /dev/null
    oha -z "${D}s" -c 64 --no-tui "$CASE_URL" > "$OUT/$CASE_NAME.oha" &
    load=$!
    sleep 2
    s0=$(segments); c0=$(cpu_ns "$CASE_PID")
    # every thread of the process and its children (an nginx master's workers)
    pids=$(proc_tree "$CASE_PID" | tr ' ' ',')
    perf record -q -F "$F" -o "$OUT/$CASE_NAME.data" -p "$pids" -- sleep "$S" > /dev/null 2>&1
    s1=$(segments); c1=$(cpu_ns "$CASE_PID")
    wait "$load"
    us=$(awk -v c=$((c1 - c0)) -v s=$((s1 - s0)) 'BEGIN {printf "%.3f", c / 1000 / (s / 4)}')
    log "$CASE_NAME: $(( (s1 - s0) / 4 / S )) req/s, $us µs a request while sampled"
    echo "$us" > "$OUT/$CASE_NAME.us"
    perf report -q -i "$OUT/$CASE_NAME.data" --no-children --sort dso,sym -F overhead,dso,sym \
        --stdio 2> /dev/null > "$OUT/$CASE_NAME.frames"
    stop_proxy
done
python3 - "$OUT" "$TOP" "${names[@]}" <<'PY'
import sys, re, collections
out, top, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
cost, split, us = {}, {}, {}
for n in names:
    us[n] = float(open(f"{out}/{n}.us").read())
    c, s = collections.Counter(), collections.Counter()
    for line in open(f"{out}/{n}.frames"):
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)", line)
        if not m:
            continue
        share, dso, kind, sym = float(m[1]) / 100, m[2], m[3], m[4].strip()
        c[sym] += share * us[n]
        part = ("kernel" if kind == "k" else "vdso" if "vdso" in dso
                else "libc" if dso.startswith("libc") else "own")
        s[part] += share * us[n]
    cost[n], split[n] = c, s
w = max(10, *(len(n) for n in names))
print(f"µs a request (CPU while sampled: " + ", ".join(f"{n} {us[n]:.2f}" for n in names) + ")")
print(f"{'frame':60s}" + "".join(f"{n:>{w + 1}s}" for n in names))
for sym, _ in cost[names[0]].most_common(top):
    print(f"{sym[:60]:60s}" + "".join(f"{cost[n].get(sym, 0):{w + 1}.3f}" for n in names))
print()
for part in ("kernel", "own", "libc", "vdso"):
    print(f"{part:60s}" + "".join(f"{split[n][part]:{w + 1}.3f}" for n in names))
PY
