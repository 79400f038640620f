# Shared helpers for loadtest/*.sh: start processes, remember their PIDs, stop them all on
# exit (by PID, never by name). Loopback only.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# FULCRUM=path runs that binary instead of building target/release/fulcrum (loadtest/pgo.sh's).
FULCRUM=${FULCRUM:-$ROOT/target/release/fulcrum}
OUT=${OUT:-$(mktemp -d /tmp/fulcrum-loadtest.XXXXXX)}
mkdir -p "$OUT" # a given OUT may not exist yet: every script writes into it
PIDS=()

build() {
    [[ $FULCRUM != "$ROOT/target/release/fulcrum" ]] ||
        cargo build --release --locked --manifest-path "$ROOT/Cargo.toml" >&2
}

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

# ---- the anchors' setup, for scripts that compare fulcrum with nginx and HAProxy --------
BENCH=${BENCH:-$ROOT/../shared/bench}

# render SRC DST KEY=VALUE...: fill the @KEY@ placeholders of ../shared/bench/conf files
render() {
    local src=$1 dst=$2 kv args=()
    shift 2
    for kv in "$@"; do args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
    sed "${args[@]}" "$src" > "$dst"
}

# start_backends: the anchors' backend, one nginx answering "ok\n" on 127.0.0.1:9001-9004
start_backends() {
    mkdir -p "$OUT/backend"
    render "$BENCH/conf/backend-nginx.conf" "$OUT/backend/nginx.conf" \
        WORKERS="${BACKEND_WORKERS:-1}" RUNDIR="$OUT/backend" USER="$(id -un)"
    start backend nginx -p "$OUT/backend" -c "$OUT/backend/nginx.conf" -g 'daemon off;'
    wait_http http://127.0.0.1:9001/
}

# start_proxy CASE: fulcrum-tN, haproxy-tN, nginx-wN or floor-MODE[-tN] (loadtest/floor, a
# relay that does no HTTP work) in front of those backends; sets
# CASE_URL and CASE_PID. Ports: fulcrum 8080 (admin 9099), nginx 8081, HAProxy 8082, floor 8083.
# fulcrum adds no headers, as the anchors add none; FULCRUM_HEADERS=on keeps its defaults
# (X-Forwarded-*, X-Request-Id), as in anchors.sh; FULCRUM_SERVER adds lines to its [server].
start_proxy() {
    local c=$1 n
    mkdir -p "$OUT/$c"
    case "$c" in
        fulcrum-t*)
            n=${c#fulcrum-t}
            sed "s|^# worker_threads is set.*|worker_threads = $n|" "$ROOT/loadtest/anchors.toml" \
                > "$OUT/$c/fulcrum.toml"
            [[ ${FULCRUM_HEADERS:-off} == on ]] &&
                sed -i '/^forwarded_headers = false$/d; /^request_id = false$/d' "$OUT/$c/fulcrum.toml"
            # FULCRUM_SERVER: extra [server] lines, e.g. "batch_sends = false" for comparisons.
            [[ -n ${FULCRUM_SERVER:-} ]] &&
                sed -i "s|^\[server\]\$|[server]\n${FULCRUM_SERVER}|" "$OUT/$c/fulcrum.toml"
            start "$c" env RUST_LOG=warn "$FULCRUM" -c "$OUT/$c/fulcrum.toml"
            CASE_URL=http://127.0.0.1:8080/ ;;
        nginx-w*)
            n=${c#nginx-w}
            render "$BENCH/conf/proxy-nginx.conf" "$OUT/$c/nginx.conf" \
                WORKERS="$n" PORT=8081 RUNDIR="$OUT/$c" USER="$(id -un)"
            start "$c" nginx -p "$OUT/$c" -c "$OUT/$c/nginx.conf" -e "$OUT/$c/error.log" -g 'daemon off;'
            CASE_URL=http://127.0.0.1:8081/ ;;
        haproxy-t*)
            n=${c#haproxy-t}
            render "$BENCH/conf/proxy-haproxy.cfg" "$OUT/$c/haproxy.cfg" THREADS="$n" PORT=8082
            start "$c" haproxy -db -f "$OUT/$c/haproxy.cfg"
            CASE_URL=http://127.0.0.1:8082/ ;;
        floor-*)
            # loadtest/floor's relay (no HTTP work): floor-MODE[-touchBYTES][-tN], MODE epoll,
            # epoll-batch or uring; -touchBYTES: each message also touches BYTES of its
            # connection's memory; -tN (epoll modes): N loops, one a CPU
            local mode=${c#floor-} touch=0
            n=1
            [[ $mode =~ ^(.*)-t([0-9]+)$ ]] && { mode=${BASH_REMATCH[1]}; n=${BASH_REMATCH[2]}; }
            [[ $mode =~ ^(.*)-touch([0-9]+)$ ]] && { mode=${BASH_REMATCH[1]}; touch=${BASH_REMATCH[2]}; }
            [[ -x $ROOT/loadtest/floor/target/release/floor ]] ||
                cargo build --release --locked --manifest-path "$ROOT/loadtest/floor/Cargo.toml" >&2
            start "$c" "$ROOT/loadtest/floor/target/release/floor" "$mode" 8083 \
                9001,9002,9003,9004 --touch "$touch" --threads "$n"
            CASE_URL=http://127.0.0.1:8083/ ;;
        *) echo "unknown case $c" >&2; return 2 ;;
    esac
    CASE_PID=$LAST_PID
    wait_http "$CASE_URL"
    # An answer from a process left over on the port would otherwise pass for this one's.
    kill -0 "$CASE_PID" 2>/dev/null || { echo "$c exited at start (port taken?)" >&2; return 1; }
}

# start_case SPEC: one case of ab.sh's or sched.sh's CASES, started with start_proxy: an
# anchor or fulcrum by name (nginx-wN, haproxy-tN, fulcrum-tN; "=-" after it allowed), or
# NAME=BINARY[;line;line...], that fulcrum binary with T worker threads (default 2) and the
# lines added to its [server] table. Sets CASE_NAME besides start_proxy's CASE_URL, CASE_PID.
start_case() {
    local spec=$1 rest extra=""
    CASE_NAME=${spec%%=*}; rest=${spec#*=}
    if [[ $spec != *=* || $rest == - ]]; then
        start_proxy "$CASE_NAME"
    else
        [[ $rest == *";"* ]] && extra=${rest#*;}
        FULCRUM=${rest%%;*} FULCRUM_SERVER=${extra//;/\\n} start_proxy "fulcrum-t${T:-2}"
    fi
}

# round_order ROUND CASES: the cases in the order round ROUND runs them, reversed in even
# rounds so that no case always runs first or last
round_order() {
    if (($1 % 2)); then echo "$2"; else echo "$2" | tr ' ' '\n' | tac | tr '\n' ' '; fi
}

# median_cell ROWS COLUMN le|ge LINE: "median (rows meeting the line of rows) [lo-hi]" of one
# column of tab-separated ROWS (campaign.sh's runs, ab.sh's rounds), [lo-hi] the
# distribution-free 95 % confidence interval of the median: the k-th smallest and k-th
# largest row, k the largest with P(Binomial(n, 1/2) < k) <= 2.5 % (none below 6 rows).
median_cell() {
    local vals met
    vals=$(echo "$1" | cut -f"$2" | sort -g)
    met=$(echo "$vals" | awk -v op="$3" -v line="$4" '{ m += (op == "le" ? $1 <= line : $1 >= line) } END { print m + 0 }')
    echo "$vals" | awk -v met="$met" '{ v[NR] = $1 }
        END {
            n = NR; med = (n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2)
            k = 0; p = 0.5 ^ n; cdf = p
            for (j = 1; cdf <= 0.025; j++) { k = j; p = p * (n - j + 1) / j; cdf += p }
            ci = (k > 0 ? sprintf("[%.2f-%.2f]", v[k], v[n - k + 1]) : "[-]")
            printf "%.3f (%d of %d) %s", med, met, n, ci
        }'
}

# stop_proxy: stops the last started proxy (and waits for it to go)
stop_proxy() {
    kill -TERM "$CASE_PID" 2>/dev/null || true
    local i
    for i in $(seq 100); do kill -0 "$CASE_PID" 2>/dev/null || return 0; sleep 0.05; done
    kill -KILL "$CASE_PID" 2>/dev/null || true
}

# proc_tree PID: PID and its children (an nginx master and its workers), as the sums below read them
proc_tree() {
    echo "$1" $(cat /proc/"$1"/task/*/children 2>/dev/null)
}

# rss_kib PID: resident memory of PID and its children (nginx master + workers), KiB
rss_kib() {
    local p v t=0
    for p in $(proc_tree "$1"); do
        v=$(awk '/^VmRSS/ {print $2}' /proc/"$p"/status 2>/dev/null || true)
        t=$((t + ${v:-0}))
    done
    echo $t
}

# cpu_ns PID: nanoseconds on a CPU of every thread of PID and of its children, from the
# scheduler's own clock (/proc/.../schedstat), where cpu_ticks samples at the timer tick
cpu_ns() {
    local p t=0 v
    for p in $(proc_tree "$1"); do
        v=$(cat /proc/"$p"/task/*/schedstat 2>/dev/null | awk '{n += $1} END {printf "%.0f\n", n}')
        t=$((t + ${v:-0}))
    done
    echo $t
}

# segments: TCP segments sent on the whole machine (loopback: every one is also received);
# the ideal is 4 a request through a proxy (request and response on each side, acks riding
# on data), so requests are segments / 4
segments() { awk '$1 == "Tcp:" && $2 ~ /^[0-9]/ {print $12}' /proc/net/snmp; }

# cpu_ticks PID: user+system clock ticks of PID and its children
cpu_ticks() {
    local p v t=0
    for p in $(proc_tree "$1"); do
        v=$(sed 's/.*) //' /proc/"$p"/stat 2>/dev/null | awk '{print $12 + $13}' || true)
        t=$((t + ${v:-0}))
    done
    echo $t
}
