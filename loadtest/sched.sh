#!/usr/bin/env bash
# Where the machine's idle time goes under load: per case (fulcrum or an anchor in front of
# the anchors' backend), `oha -c 64` for D seconds, and for S seconds from 1.5 s in (D must
# exceed 1.5 + S) the scheduler's own events on every CPU (`perf record -e
# sched:sched_switch,sched_wakeup,sched_wakeup_new,sched_migrate_task -a`). loadtest/sched.py
# replays them into each CPU's run queue and splits every instant a CPU sat idle by what the
# other CPUs held then: "bubble" when a task that could have run here (woken onto a busy CPU,
# or preempted there) waited; "pinned" when only tasks bound to another CPU waited (fulcrum's
# workers by default); "dry" when nothing was runnable anywhere (the pipeline ran out of
# work). Also each party's time runnable but not running a request (a spinning fulcrum worker
# that yields counts as waiting). Tasks are told apart by PID (proxy, backend, generator),
# since the anchors' proxy and backend are both nginx. perf adds its own switches; compare
# cases within one run. Rounds alternate the order.
#   loadtest/sched.sh
#   CASES="fulcrum-t2 nginx-w2 haproxy-t2" ROUNDS=3 D=6 S=1.5 loadtest/sched.sh
#   CASES="a=BIN b=BIN;busy_poll=\"0s\"" loadtest/sched.sh      # builds or settings, as ab.sh
# Needs perf (Debian linux-perf), oha, nginx, HAProxy (../shared/bench/install.sh). Loopback
# only; everything started is stopped by PID.
source "$(dirname "$0")/lib.sh"
CASES=${CASES:-fulcrum-t2 nginx-w2 haproxy-t2}; ROUNDS=${ROUNDS:-2}; D=${D:-6}; S=${S:-1.5}
T=${T:-2}
command -v perf > /dev/null || { echo "needs perf (apt-get install linux-perf)" >&2; exit 2; }
build
start_backends
BACKEND_PID=${PIDS[0]}
# tids PID: every thread of PID and of its children
tids() { local p; for p in $(proc_tree "$1"); do ls /proc/"$p"/task 2>/dev/null; done | tr '\n' ' '; }
# pinned TID...: those of the threads that may run on one CPU only
pinned() {
    local t
    for t in "$@"; do
        [[ $(awk '/^Cpus_allowed_list/ {print $2}' /proc/"$t"/status 2>/dev/null) =~ ^[0-9]+$ ]] &&
            echo -n "$t "
    done
    true
}

for r in $(seq "$ROUNDS"); do
    for c in $(round_order "$r" "$CASES"); do
        start_case "$c"; name=$CASE_NAME
        wrk -t1 -c64 -d2s "$CASE_URL" > /dev/null
        oha -z "${D}s" -c 64 --no-tui --output-format json "$CASE_URL" > "$OUT/$name.json" 2>/dev/null &
        gen=$!
        sleep 1.5
        ptids=$(tids "$CASE_PID")
        roles="proxy:$ptids;backend:$(tids "$BACKEND_PID");generator:$(tids "$gen");pinned:$(pinned $ptids)"
        perf record -q -e sched:sched_switch -e sched:sched_wakeup -e sched:sched_wakeup_new \
            -e sched:sched_migrate_task -a -o "$OUT/$name.data" -- sleep "$S" > /dev/null 2>&1
        wait "$gen"
        stop_proxy
        perf script -i "$OUT/$name.data" -F cpu,time,event,trace > "$OUT/$name.txt" 2>/dev/null
        python3 "$ROOT/loadtest/sched.py" "$OUT/$name.txt" "$(jq '.summary.requestsPerSec' "$OUT/$name.json")" \
            "$roles" "$name" | tee -a "$OUT/sched.tsv"
    done
done
echo "== mean over $ROUNDS round(s), µs a request (oha -c 64, $S s of events a round; raw: $OUT/sched.tsv)"
python3 - "$OUT/sched.tsv" <<'PY'
import sys, collections
d = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    case, key, val = line.rstrip("\n").split("\t")
    d[case][key].append(float(val))
columns = [("req/s", "req/s"), ("idle", "idle"), ("idle: work waiting on another cpu", "bubble"),
           ("idle: only pinned work waiting elsewhere", "pinned"), ("idle: nothing runnable", "dry"),
           ("wait: proxy", "wait: proxy"), ("wait: backend", "wait: backend"),
           ("wait: generator", "wait: generator"), ("wait: other", "wait: other")]
print("case".ljust(12) + "".join(label.rjust(16) for _, label in columns))
for case, v in d.items():
    print(case.ljust(12) + "".join(f"{sum(v[k]) / len(v[k]):16.2f}" if v[k] else "-".rjust(16) for k, _ in columns))
PY
