#!/usr/bin/env bash
# A/B of fulcrum builds or settings, alternating, with the whole machine's CPU per request:
# each round starts every case in turn on the anchors' backends (one nginx worker on
# 127.0.0.1:9001-9004), warms it with wrk for 2 s, loads it with oha (or wrk) for D seconds,
# and reports req/s and the CPU time per request of the proxy, the backend, the load
# generator and what the machine left idle (from /proc: each process's ticks, /proc/stat's
# idle; the generator's from /usr/bin/time). Then the mean per case over the rounds.
#   CASES="before=/tmp/fulcrum-old after=target/release/fulcrum" loadtest/ab.sh
#   CASES="on=target/release/fulcrum off=target/release/fulcrum;batch_sends=false" \
#       TOOL=wrk ROUNDS=6 D=8 loadtest/ab.sh
#   CASES="fulcrum=target/release/fulcrum nginx-w2=-" loadtest/ab.sh   # nginx-wN: the anchor
#   RATE=12000 CASES=... loadtest/ab.sh       # oha at a fixed rate instead of flat out
# A case is NAME=BINARY, then ;-separated lines added to fulcrum's [server] table (from
# loadtest/anchors.toml with worker_threads = T, default 2). Needs ../shared/bench/install.sh
# once. Loopback only; everything started is stopped by PID.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONF=${BENCH:-$ROOT/../shared/bench}/conf
ROUNDS=${ROUNDS:-4}; D=${D:-6}; TOOL=${TOOL:-oha}; T=${T:-2}
W=$(mktemp -d /tmp/fulcrum-ab.XXXXXX); mkdir -p "$W/backend"
sed -e "s|@USER@|$(id -un)|" -e "s|@WORKERS@|1|" -e "s|@RUNDIR@|$W/backend|g" \
    "$CONF/backend-nginx.conf" > "$W/backend/nginx.conf"
nginx -p "$W/backend" -c "$W/backend/nginx.conf" -e "$W/backend/err.log" -g 'daemon off;' &
BPID=$!
FP=
trap 'kill $BPID ${FP:-} 2>/dev/null; wait 2>/dev/null' EXIT
sleep 0.5
ticks() { local s=0 p; for p in "$@"; do s=$((s + $(awk '{print $14+$15}' /proc/"$p"/stat))); done; echo $s; }
idle() { awk '/^cpu /{print $5+$6}' /proc/stat; }
for r in $(seq "$ROUNDS"); do
    for c in $CASES; do
        name=${c%%=*}; rest=${c#*=}; bin=${rest%%;*}; extra=""
        [[ $rest == *";"* ]] && extra=${rest#*;}
        if [[ $name == nginx-w* ]]; then
            mkdir -p "$W/$name"
            sed -e "s|@USER@|$(id -un)|" -e "s|@WORKERS@|${name#nginx-w}|" -e "s|@RUNDIR@|$W/$name|g" \
                -e "s|@PORT@|8080|" "$CONF/proxy-nginx.conf" > "$W/$name/nginx.conf"
            nginx -p "$W/$name" -c "$W/$name/nginx.conf" -e "$W/$name/err.log" -g 'daemon off;' \
                > "$W/proxy.log" 2>&1 &
            FP=$!
        else
            sed "s|^# worker_threads is set.*|worker_threads = $T\n${extra//;/\\n}|" \
                "$ROOT/loadtest/anchors.toml" > "$W/fulcrum.toml"
            env RUST_LOG=warn "$bin" -c "$W/fulcrum.toml" > "$W/proxy.log" 2>&1 &
            FP=$!
        fi
        for _ in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:8080/ && break; sleep 0.1; done
        wrk -t1 -c64 -d2s http://127.0.0.1:8080/ > /dev/null
        pids="$FP $(pgrep -P "$FP" | tr '\n' ' ')"
        bw=$(pgrep -P $BPID | head -1)
        f0=$(ticks $pids); b0=$(ticks "$bw"); i0=$(idle)
        if [[ $TOOL == oha ]]; then
            /usr/bin/time -f "%U %S" -o "$W/time.txt" timeout $((D + 30)) \
                oha -z "${D}s" -c 64 ${RATE:+-q "$RATE"} --no-tui --output-format json http://127.0.0.1:8080/ > "$W/out.json" 2>/dev/null
            rps=$(jq '.summary.requestsPerSec' "$W/out.json")
        else
            /usr/bin/time -f "%U %S" -o "$W/time.txt" timeout $((D + 30)) \
                wrk -t2 -c64 -d"${D}s" http://127.0.0.1:8080/ > "$W/out.txt"
            rps=$(awk '/Requests\/sec/{print $2}' "$W/out.txt")
        fi
        f1=$(ticks $pids); b1=$(ticks "$bw"); i1=$(idle)
        kill "$FP"; wait "$FP" 2>/dev/null; FP=
        gen=$(awk '{print $1+$2}' "$W/time.txt")
        python3 - "$name" "$rps" "$D" $((f1 - f0)) $((b1 - b0)) $((i1 - i0)) "$gen" "$(getconf CLK_TCK)" <<'PY'
import sys
name, rps, d, f, b, i, gen, hz = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), *map(float, sys.argv[4:])
req = rps * d
us = lambda t: t / hz * 1e6 / req
print(f"{name}\t{rps:.0f}\tproxy {us(f):.2f}\tbackend {us(b):.2f}\tgen {gen * 1e6 / req:.2f}\tidle {us(i):.2f}", flush=True)
PY
    done
done | tee "$W/rounds.tsv"
echo "== mean over $ROUNDS round(s), CPU in µs per request ($TOOL)"
python3 - "$W/rounds.tsv" <<'PY'
import sys, collections
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    p = line.rstrip("\n").split("\t")
    d[p[0]].append([float(p[1])] + [float(x.split()[1]) for x in p[2:]])
for k, v in d.items():
    m = [sum(c) / len(c) for c in zip(*v)]
    print(f"{k:12s} {m[0]:8.0f} req/s  proxy {m[1]:6.2f}  backend {m[2]:6.2f}  gen {m[3]:6.2f}  idle {m[4]:6.2f}")
PY
rm -rf "$W"
