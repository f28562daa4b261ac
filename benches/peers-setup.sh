#!/usr/bin/env bash
# Installs what `cargo bench --bench stampede` compares Corral with, and the load tool:
#   nginx    proxy_cache with proxy_cache_lock on (and the no-work ceiling: `return 200`)
#   varnish  varnishd with its default request coalescing
#   wrk      the HTTP load generator for the hit-throughput row
#   redis-server is needed by the bench itself (and by the test suite).
# Debian/Ubuntu only. The packaged services are stopped and disabled again right away: the bench
# starts its own nginx/varnishd processes on free loopback ports, with configs in a tempdir.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
# policy-rc.d exit 101 keeps the packages' postinst from starting services on port 80/6081.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" = 1 ]; then
        $SUDO rm -f "$policy"
    fi
}
trap cleanup EXIT

$SUDO apt-get install -y --no-install-recommends nginx varnish wrk redis-server

# If an init system started them anyway, stop them: the bench runs its own instances.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now nginx varnish varnishncsa 2>/dev/null || true
fi

for tool in nginx varnishd wrk redis-server; do
    if command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ]; then
        echo "ok: $tool"
    else
        echo "missing: $tool" >&2
    fi
done
