#!/usr/bin/env bash
# A/B of fulcrum builds or settings, alternating, with the whole machine's CPU per request:
# each round starts every case in turn on the anchors' backends (lib.sh's start_backends),
# warms it with wrk for 2 s, loads it with oha (or wrk) for D seconds, and reports req/s and
# the CPU time per request of the proxy, the backend, the load generator and what the machine
# left idle (the proxy's and backend's from the scheduler's clock, /proc/PID/task/*/schedstat;
# /proc/stat's idle; the generator's from /usr/bin/time), cross-core wake-ups, context
# switches and TCP segments sent (from /proc/net/snmp; 4 a request is the floor through a
# proxy) per request. Then the mean per case over the rounds, and how many rounds the first
# case moved more requests than each other one (with a sign test's p: this machine's speed
# drifts more between rounds than most changes move it). Even rounds run the cases in
# reverse order.
#   CASES="before=/tmp/fulcrum-old after=target/release/fulcrum" loadtest/ab.sh
#   CASES="on=target/release/fulcrum off=target/release/fulcrum;batch_sends=false" \
#       TOOL=wrk ROUNDS=6 D=8 loadtest/ab.sh
#   CASES="fulcrum=target/release/fulcrum nginx-w2=- haproxy-t2=-" loadtest/ab.sh   # anchors
#   CASES="fulcrum=target/release/fulcrum floor-epoll-batch=- floor-uring=-" loadtest/ab.sh
#       # beside loadtest/floor's relays, which do no HTTP work (see floor.sh)
#   RATE=12000 CASES=... loadtest/ab.sh       # oha at a fixed rate instead of flat out
#   LINE=1.1 REPORT=results/FILE.tsv loadtest/ab.sh   # a kept rounds file summarised again,
#       counting the rounds where the first case's ratio to another is at or above LINE (1.0)
# A case is NAME=BINARY, then ;-separated lines added to fulcrum's [server] table (from
# loadtest/anchors.toml with worker_threads = T, default 2). Needs ../shared/bench/install.sh
# once. Loopback only; everything started is stopped by PID.

# REPORT reads a kept file and writes nothing: no scratch directory for it (and a missing
# file ends here, before lib.sh would make OUT).
if [[ -n ${REPORT:-} ]]; then
    [[ -f $REPORT ]] || { echo "no such file: $REPORT" >&2; exit 1; }
    OUT=${OUT:-$(dirname "$REPORT")}
fi
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-4}; D=${D:-6}; TOOL=${TOOL:-oha}; T=${T:-2}

# summary FILE: the mean per case, and the first case against each other one round by round
summary() {
    python3 - "$1" <<'PY'
import sys, collections, math
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    p = line.rstrip("\n").split("\t")
    if len(p) < 9:
        continue  # a summary kept below the rounds
    d[p[0]].append([float(p[1])] + [float(x.split()[1]) for x in p[2:]])
for k, v in d.items():
    m = [sum(c) / len(c) for c in zip(*v)]
    print(f"{k:12s} {m[0]:8.0f} req/s  proxy {m[1]:6.2f}  backend {m[2]:6.2f}  gen {m[3]:6.2f}  idle {m[4]:6.2f}"
          f"  ipi {m[5]:5.3f}  cs {m[6]:5.3f}  segs {m[7]:5.3f}")
# The machine's speed drifts by tens of per cent from one minute to the next (every process's
# CPU time stays put while all their costs per request move together), so a mean can hide
# which case was ahead when both ran in the same minute: count the rounds.
names = list(d)
for other in names[1:]:
    ahead = sum(a[0] > b[0] for a, b in zip(d[names[0]], d[other]))
    n = min(len(d[names[0]]), len(d[other]))
    # Two-sided sign test: how likely a split at least this uneven is if neither is faster.
    k = min(ahead, n - ahead)
    p = min(1.0, 2 * sum(math.comb(n, j) for j in range(k + 1)) / 2 ** n)
    print(f"{names[0]} moved more requests than {other} in {ahead} of {n} rounds (sign test p = {p:.2f})")
PY
    # And the ratio inside each round (the i-th row of each case is round i's).
    local cases first other ratios
    cases=$(awk -F'\t' 'NF >= 9 && !seen[$1]++ {print $1}' "$1")
    first=$(head -1 <<< "$cases")
    for other in $(tail -n +2 <<< "$cases"); do
        ratios=$(awk -F'\t' -v a="$first" -v b="$other" 'NF >= 9 {
                if ($1 == a) x[++i] = $2; if ($1 == b) y[++j] = $2 }
            END { for (k = 1; k <= i && k <= j; k++) printf "%.6f\n", x[k] / y[k] }' "$1")
        echo "requests $first / $other in a round, median (rounds at or above ${LINE:-1.0}) [95 % interval]:" \
            "$(median_cell "$ratios" 1 ge "${LINE:-1.0}")"
    done
}
if [[ -n ${REPORT:-} ]]; then
    summary "$REPORT"
    exit
fi

start_backends
BACKEND_PID=${PIDS[0]}
idle_ticks() { awk '/^cpu / {print $5 + $6}' /proc/stat; }
# wake-ups that cross cores (rescheduling and function-call interrupts) and context switches
ipis() { awk '$1 == "RES:" || $1 == "CAL:" {for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i} END {print n}' /proc/interrupts; }
switches() { awk '$1 == "ctxt" {print $2}' /proc/stat; }

# The rounds run in a pipeline's subshell, which does not inherit the EXIT trap: it stops
# what it started itself if it fails half-way.
for r in $(seq "$ROUNDS"); do
    trap cleanup EXIT
    for c in $(round_order "$r" "$CASES"); do
        start_case "$c"; name=$CASE_NAME
        wrk -t1 -c64 -d2s "$CASE_URL" > /dev/null
        f0=$(cpu_ns "$CASE_PID"); b0=$(cpu_ns "$BACKEND_PID"); i0=$(idle_ticks)
        q0=$(ipis); s0=$(switches); g0=$(segments)
        if [[ $TOOL == oha ]]; then
            /usr/bin/time -f "%U %S" -o "$OUT/time.txt" timeout $((D + 30)) \
                oha -z "${D}s" -c 64 ${RATE:+-q "$RATE"} --no-tui --output-format json "$CASE_URL" \
                > "$OUT/out.json" 2>/dev/null
            rps=$(jq '.summary.requestsPerSec' "$OUT/out.json")
        else
            /usr/bin/time -f "%U %S" -o "$OUT/time.txt" timeout $((D + 30)) \
                wrk -t2 -c64 -d"${D}s" "$CASE_URL" > "$OUT/out.txt"
            rps=$(awk '/Requests\/sec/{print $2}' "$OUT/out.txt")
        fi
        f1=$(cpu_ns "$CASE_PID"); b1=$(cpu_ns "$BACKEND_PID"); i1=$(idle_ticks)
        q1=$(ipis); s1=$(switches); g1=$(segments)
        stop_proxy
        gen=$(awk '{print $1 + $2}' "$OUT/time.txt")
        python3 - "$name" "$rps" "$D" $((f1 - f0)) $((b1 - b0)) $((i1 - i0)) "$gen" "$(getconf CLK_TCK)" \
            $((q1 - q0)) $((s1 - s0)) $((g1 - g0)) <<'PY'
import sys
name, rps, d, f, b, i, gen, hz, q, s, g = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), *map(float, sys.argv[4:])
req = rps * d
us = lambda t: t / hz * 1e6 / req
ns = lambda t: t / 1e3 / req
print(f"{name}\t{rps:.0f}\tproxy {ns(f):.2f}\tbackend {ns(b):.2f}\tgen {gen * 1e6 / req:.2f}\tidle {us(i):.2f}"
      f"\tipi {q / req:.3f}\tcs {s / req:.3f}\tsegs {g / req:.3f}", flush=True)
PY
    done
done | tee "$OUT/rounds.tsv"
echo "== mean over $ROUNDS round(s), CPU in µs per request ($TOOL)"
summary "$OUT/rounds.tsv"
