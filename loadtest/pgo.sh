#!/usr/bin/env bash
# fulcrum built with profile-guided optimisation, trained on proxied traffic:
#   1. an instrumented release build (target/pgo-gen),
#   2. training: that binary in front of the anchors' backend (nginx on 127.0.0.1:9001-9004)
#      at one and at two worker threads, with and without its default forwarding headers,
#      under wrk (and oha, and h2load over h2c, when installed),
#   3. the profiles merged (llvm-profdata from rustup's llvm-tools, added if missing),
#   4. the release build again with them: target/pgo/release/fulcrum.
# The profile is made from the sources being built, every time: nothing stale is committed.
#   loadtest/pgo.sh                       (needs wrk and nginx: ../shared/bench/install.sh)
#   FULCRUM=target/pgo/release/fulcrum loadtest/anchors.sh
source "$(dirname "$0")/lib.sh"
TRAIN=${TRAIN:-6}   # seconds of each training load
DATA=$ROOT/target/pgo-data
host=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata
[[ -x $PROFDATA ]] || rustup component add llvm-tools-preview >&2

log "instrumented build"
rm -rf "$DATA"
RUSTFLAGS="-Cprofile-generate=$DATA" cargo build --release --locked \
    --manifest-path "$ROOT/Cargo.toml" --target-dir "$ROOT/target/pgo-gen" >&2
FULCRUM=$ROOT/target/pgo-gen/release/fulcrum

log "training"
start_backends
for headers in off on; do
    for threads in 1 2; do
        FULCRUM_HEADERS=$headers start_proxy "fulcrum-t$threads"
        wrk -t2 -c64 -d"${TRAIN}s" "$CASE_URL" | awk '/Requests\/sec/ {print "  wrk", $2, "req/s"}' >&2
        if command -v oha >/dev/null; then
            oha -z "$((TRAIN / 2))s" -c 64 --no-tui --output-format quiet "$CASE_URL" || true
        fi
        if command -v h2load >/dev/null; then
            h2load -n 20000 -c 4 -m 20 "$CASE_URL" >/dev/null || true
        fi
        # A clean exit writes the profile.
        stop_proxy
    done
done
ls "$DATA"/*.profraw >/dev/null

log "merging $(ls "$DATA"/*.profraw | wc -l) profiles"
"$PROFDATA" merge -o "$DATA/fulcrum.profdata" "$DATA"/*.profraw

log "optimised build"
RUSTFLAGS="-Cprofile-use=$DATA/fulcrum.profdata" cargo build --release --locked \
    --manifest-path "$ROOT/Cargo.toml" --target-dir "$ROOT/target/pgo" >&2
log "built $ROOT/target/pgo/release/fulcrum"
