#!/usr/bin/env bash
# TLS figures, fulcrum beside nginx with the same certificate and backends:
#   full handshakes per second (openssl s_time -new: a new TLS session per connection),
#   HTTPS req/s on kept-alive connections (oha -z ${DURATION}s -c 64), and
#   RSS per idle TLS connection (IDLE connections opened and held).
#   loadtest/tls.sh         (needs nginx, oha, openssl: ../shared/bench/install.sh)
source "$(dirname "$0")/lib.sh"
DURATION=${DURATION:-10}
IDLE=${IDLE:-2000}
build
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=bench.test -addext subjectAltName=DNS:bench.test \
    -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2>/dev/null
for i in 1 2; do start "backend$i" "$FULCRUM" backend --listen "127.0.0.1:960$i" --name "b$i"; done
cat > "$OUT/fulcrum.toml" <<CONF
[server]
worker_threads = 2
[admin]
listen = "127.0.0.1:9695"
[[listeners]]
name = "https"
listen = "127.0.0.1:9643"
tls = { certificates = [ { cert = "$OUT/cert.pem", key = "$OUT/key.pem" } ] }
[[routes]]
pool = "p"
[pools.p]
backends = [{ address = "127.0.0.1:9601" }, { address = "127.0.0.1:9602" }]
CONF
mkdir -p "$OUT/nginx"
cat > "$OUT/nginx/nginx.conf" <<CONF
worker_processes 2;
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    upstream b { server 127.0.0.1:9601; server 127.0.0.1:9602; keepalive 64; }
    server {
        listen 127.0.0.1:9644 ssl reuseport;
        http2 on;
        ssl_certificate $OUT/cert.pem;
        ssl_certificate_key $OUT/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        keepalive_requests 1000000;
        location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
CONF
sed -i 's/^        http2 on;$//' "$OUT/nginx/nginx.conf"   # nginx 1.22 takes http2 on the listen line
sed -i 's/listen 127.0.0.1:9644 ssl reuseport;/listen 127.0.0.1:9644 ssl http2 reuseport;/' "$OUT/nginx/nginx.conf"
start fulcrum env RUST_LOG=warn "$FULCRUM" -c "$OUT/fulcrum.toml"; FPID=$LAST_PID
start nginx nginx -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" -e "$OUT/nginx/error.log" -g 'daemon off;'; NPID=$LAST_PID
wait_http http://127.0.0.1:9695/ready
sleep 1
printf '%-8s %14s %12s %9s %20s\n' proxy handshakes/s req/s p99_ms rss_per_idle_conn
for name in fulcrum nginx; do
    port=9643; pid=$FPID; [[ $name == nginx ]] && { port=9644; pid=$NPID; }
    # s_time prints "N connections in T real seconds"; report connections per real second
    hs=$(timeout 30 openssl s_time -connect 127.0.0.1:$port -new -time 8 2>/dev/null | awk '/real seconds/ {printf "%.0f", $1 / $4}' || true)
    oha -z "${DURATION}s" -c 64 --insecure --no-tui --output-format json "https://127.0.0.1:$port/" > "$OUT/$name.json"
    rps=$(jq -r '.summary.requestsPerSec | floor' "$OUT/$name.json"); p99=$(jq -r '.latencyPercentiles.p99 * 1000 * 1000 | floor / 1000' "$OUT/$name.json")
    before=$(rss_kib "$pid")
    python3 - "$port" "$IDLE" <<'PY' &
import socket, ssl, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
held = []
for _ in range(n):
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="bench.test")
    held.append(s)
time.sleep(4)
PY
    HOLD=$!
    sleep 3
    during=$(rss_kib "$pid")
    wait $HOLD
    printf '%-8s %14s %12s %9s %17s B\n' "$name" "$hs" "$rps" "$p99" "$(( (during - before) * 1024 / IDLE ))"
done
