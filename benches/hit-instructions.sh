#!/usr/bin/env bash
# Instructions per L1 hit of a whole `corral run` process (every thread, user space: hyper, the
# proxy, the access-line writer), counted by callgrind, which counts the same on a busy machine as
# on an idle one. Corral runs twice under callgrind, serving HITS_SMALL and then HITS_LARGE hits
# of one 2 KiB entry over HITS_CONNS keep-alive connections; the difference of the two totals,
# divided by the difference of the counts, is the cost of one hit (start-up and shutdown cancel).
#
#   cargo build --release --bin corral
#   benches/hit-instructions.sh                      # default config: access line on
#   ACCESS_LOG=false benches/hit-instructions.sh     # the access line off
#   LOG_FORMAT=json benches/hit-instructions.sh      # the lines in JSON (text is the default)
#   benches/hit-instructions.sh path/to/other/corral # another build (e.g. main's), same driver
#   HITS_KEEP=dir benches/hit-instructions.sh        # keeps the callgrind files (callgrind_annotate)
#   TARGET=nginx benches/hit-instructions.sh         # nginx proxy_cache instead (one process, no
#                                                    # master; ACCESS_LOG=true: a buffered log)
#
# Needs valgrind and python3. Everything binds 127.0.0.1; every process is stopped on exit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-$here/../target/release/corral}
small=${HITS_SMALL:-2000}
large=${HITS_LARGE:-12000}
conns=${HITS_CONNS:-4}
access_log=${ACCESS_LOG:-true}
log_format=${LOG_FORMAT:-text}
dir=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

mkfifo "$dir/upstream.in"
python3 "$here/hits/driver.py" serve < "$dir/upstream.in" > "$dir/upstream.port" &
pids+=($!)
exec 3>"$dir/upstream.in"
for _ in $(seq 100); do [ -s "$dir/upstream.port" ] && break; sleep 0.1; done
upstream=$(cat "$dir/upstream.port")

# nginx as the stampede bench runs it (proxy_cache, the same 2 KiB entry), in one process, so
# callgrind sees all of its work: the event loop serves every connection.
start_nginx() {
    local n=$1 port=$2 log="access_log off;"
    [ "$access_log" = true ] && log="access_log $dir/access.log combined buffer=64k flush=1s;"
    mkdir -p "$dir/cache"
    cat > "$dir/nginx.conf" <<CONF
daemon off;
master_process off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/nginx.error.log warn;
events { worker_connections 1024; }
http {
    $log
    client_body_temp_path $dir/client_body_temp;
    proxy_temp_path $dir/proxy_temp;
    fastcgi_temp_path $dir/fastcgi_temp;
    uwsgi_temp_path $dir/uwsgi_temp;
    scgi_temp_path $dir/scgi_temp;
    keepalive_requests 100000000;
    proxy_cache_path $dir/cache levels=1:2 keys_zone=hits:16m inactive=10m use_temp_path=off;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_cache_key \$request_uri;
    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://127.0.0.1:$upstream;
            proxy_cache hits;
        }
    }
}
CONF
    valgrind --tool=callgrind --callgrind-out-file="$dir/cg.$n" "${NGINX:-/usr/sbin/nginx}" \
        -p "$dir" -c "$dir/nginx.conf" 2> "$dir/target.$n.log" &
    target_pid=$!
    pids+=("$target_pid")
    for _ in $(seq 600); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && return
        sleep 0.1
    done
    echo "nginx did not start:" >&2; cat "$dir/target.$n.log" "$dir/nginx.error.log" >&2; exit 1
}

start_corral() {
    local n=$1 port=$2
    cat > "$dir/corral.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
shutdown_timeout = "5s"
access_log = $access_log

[[route]]
name = "hit"
path_prefix = "/hit"
upstream = "http://127.0.0.1:$upstream"
ttl = "1h"
TOML
    valgrind --tool=callgrind --callgrind-out-file="$dir/cg.$n" "$bin" --log-format "$log_format" run --config "$dir/corral.toml" \
        2> "$dir/target.$n.log" &
    target_pid=$!
    pids+=("$target_pid")
    for _ in $(seq 600); do grep -q "corral listening" "$dir/target.$n.log" && break; sleep 0.1; done
    grep -q "corral listening" "$dir/target.$n.log" || { echo "corral did not start:" >&2; cat "$dir/target.$n.log" >&2; exit 1; }
}

total_for() {
    local n=$1 port
    port=$(free_port)
    if [ "${TARGET:-corral}" = nginx ]; then start_nginx "$n" "$port"; else start_corral "$n" "$port"; fi
    python3 "$here/hits/driver.py" hit "$port" "$conns" "$conns"   # the miss, then every connection warm
    python3 "$here/hits/driver.py" hit "$port" "$n" "$conns"
    kill -TERM "$target_pid"
    wait "$target_pid" || true
    [ -n "${HITS_KEEP:-}" ] && cp "$dir/cg.$n" "$HITS_KEEP/callgrind.out.$n"
    awk '/^totals:/ {print $2}' "$dir/cg.$n"
}

a=$(total_for "$small")
b=$(total_for "$large")
echo "${TARGET:-corral} access_log=$access_log hits=$small→$large instructions: $a → $b"
echo "instructions per hit: $(( (b - a) / (large - small) ))"
