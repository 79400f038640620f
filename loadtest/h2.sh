#!/usr/bin/env bash
# HTTP/2 through h2c, fulcrum beside nginx (http2 on, same backends):
#   h2load -n ${REQUESTS} -c 10 -m 100 (prior knowledge), req/s, errors and CPU per request.
#   loadtest/h2.sh        (needs h2load from Debian's nghttp2-client, nginx)
source "$(dirname "$0")/lib.sh"
REQUESTS=${REQUESTS:-100000}
build
for i in 1 2; do start "backend$i" "$FULCRUM" backend --listen "127.0.0.1:970$i" --name "b$i"; done
cat > "$OUT/fulcrum.toml" <<CONF
[server]
worker_threads = 2
[admin]
listen = "127.0.0.1:9795"
[[listeners]]
name = "h2c"
listen = "127.0.0.1:9780"
[[routes]]
pool = "p"
[pools.p]
backends = [{ address = "127.0.0.1:9701" }, { address = "127.0.0.1:9702" }]
CONF
mkdir -p "$OUT/nginx"
cat > "$OUT/nginx/nginx.conf" <<CONF
worker_processes 2;
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_requests 1000000;
    upstream b { server 127.0.0.1:9701; server 127.0.0.1:9702; keepalive 64; }
    server {
        listen 127.0.0.1:9781 http2 reuseport;
        location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
CONF
start fulcrum env RUST_LOG=warn "$FULCRUM" -c "$OUT/fulcrum.toml"; FPID=$LAST_PID
start nginx nginx -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" -e "$OUT/nginx/error.log" -g 'daemon off;'; NPID=$LAST_PID
wait_http http://127.0.0.1:9795/ready; sleep 1
printf '%-8s %10s %10s %8s %12s\n' proxy req/s succeeded errored cpu_us/req
for name in fulcrum nginx; do
    port=9780; pid=$FPID; [[ $name == nginx ]] && { port=9781; pid=$NPID; }
    t0=$(cpu_ticks "$pid")
    h2load -n "$REQUESTS" -c 10 -m 100 "http://127.0.0.1:$port/" > "$OUT/$name.txt" 2>&1 || true
    t1=$(cpu_ticks "$pid")
    rps=$(awk '/^finished in/ {print $4}' "$OUT/$name.txt")
    ok=$(awk '/^requests:/ {print $8}' "$OUT/$name.txt")
    err=$(awk '/^requests:/ {print $12}' "$OUT/$name.txt")
    cpu=$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v n="$REQUESTS" 'BEGIN { printf "%.1f", d / hz * 1e6 / n }')
    printf '%-8s %10s %10s %8s %12s\n' "$name" "$rps" "$ok" "$err" "$cpu"
done
