#!/usr/bin/env bash
# Membership churn under load (issue: hot reload). oha -z ${DURATION}s -c 64 through fulcrum,
# once with a steady pool and once while a loop changes the pool every 100 ms through the
# admin API (replace all / add / remove, weights varied). Prints requests, errors and p99 of
# both, and the time from a PUT to the first request served by the backend it added.
#   loadtest/churn.sh       (needs oha, curl, jq: ../shared/bench/install.sh)
source "$(dirname "$0")/lib.sh"
DURATION=${DURATION:-30}
build
for i in 1 2 3 4 5 6; do
    start "backend$i" "$FULCRUM" backend --listen "127.0.0.1:940$i" --name "b$i"
done
cat > "$OUT/fulcrum.toml" <<CONF
[admin]
listen = "127.0.0.1:9415"
[[listeners]]
name = "http"
listen = "127.0.0.1:9410"
[[routes]]
pool = "p"
[pools.p]
algorithm = "round_robin"
dynamic = true
backends = [{ address = "127.0.0.1:9401" }, { address = "127.0.0.1:9402" }, { address = "127.0.0.1:9403" }]
health_check = { enabled = false }
CONF
start fulcrum env RUST_LOG=warn "$FULCRUM" -c "$OUT/fulcrum.toml"
wait_http http://127.0.0.1:9410/
for i in 1 2 3 4 5 6; do wait_http "http://127.0.0.1:940$i/"; done
API=http://127.0.0.1:9415/pools/p/backends

run_oha() {  # run_oha NAME
    oha -z "${DURATION}s" -c 64 --no-tui --output-format json http://127.0.0.1:9410/ > "$OUT/$1.json"
}
summary() {
    jq -r --arg name "$1" '[$name, (.summary.requestsPerSec|floor), ([.statusCodeDistribution|to_entries[]|.value]|add),
        (([.statusCodeDistribution|to_entries[]|select(.key!="200")|.value]|add // 0)
         + ([.errorDistribution|to_entries[]|select(.key|test("deadline")|not)|.value]|add // 0)),
        (.latencyPercentiles.p50*1000*1000|floor/1000), (.latencyPercentiles.p99*1000*1000|floor/1000)] | @tsv' "$OUT/$1.json"
}

log "steady: oha -z ${DURATION}s -c 64"
run_oha steady
log "churn: the same, with a membership change every 100 ms"
run_oha churn &
OHA=$!
changes=0; failed_changes=0
end=$(( $(date +%s) + DURATION ))
while (( $(date +%s) < end )); do
    case $((changes % 3)) in
        0) n=$((RANDOM % 4 + 2)); body=$(for i in $(seq 1 6 | shuf -n $n); do printf '{"address":"127.0.0.1:940%s","weight":%s},' "$i" $((RANDOM % 5 + 1)); done)
           code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT -d "[${body%,}]" "$API") ;;
        1) code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -d "{\"address\":\"127.0.0.1:940$((RANDOM % 6 + 1))\"}" "$API") ;;
        2) addr=$(curl -s "$API" | jq -r '[.[] | select(.draining == false) | .address] | if length > 1 then .[0] else empty end')
           code=200; [[ -n "$addr" ]] && code=$(curl -s -o /dev/null -w '%{http_code}' -X DELETE "$API/$addr") ;;
    esac
    [[ "$code" == 200 || "$code" == 400 ]] || failed_changes=$((failed_changes + 1))   # 400: adding a member twice
    changes=$((changes + 1))
    sleep 0.1
done
wait "$OHA" || true

# PUT -> first request on the backend it added: the very next request must land there.
samples=()
for i in $(seq 20); do
    target=$((i % 6 + 1))
    t0=$(date +%s%N)
    curl -s -o /dev/null -X PUT -d "[{\"address\":\"127.0.0.1:940$target\"}]" "$API"
    body=$(curl -s http://127.0.0.1:9410/)
    t1=$(date +%s%N)
    [[ "$body" == "hello from b$target"* ]] || { echo "request after PUT went to: $body" >&2; exit 1; }
    samples+=($(( (t1 - t0) / 1000 )))
done
sorted=$(printf '%s\n' "${samples[@]}" | sort -n)

printf '\n%-8s %9s %9s %7s %8s %8s\n' run req/s requests errors p50_ms p99_ms
summary steady | awk -F'\t' '{printf "%-8s %9s %9s %7s %8s %8s\n", $1, $2, $3, $4, $5, $6}'
summary churn | awk -F'\t' '{printf "%-8s %9s %9s %7s %8s %8s\n", $1, $2, $3, $4, $5, $6}'
echo "membership changes during churn: $changes (failed: $failed_changes)"
echo "PUT then GET, both through curl (20 samples): median $(echo "$sorted" | sed -n 10p) us, max $(echo "$sorted" | tail -1) us; every GET landed on the backend just added"
