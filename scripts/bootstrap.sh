# Sourced by scripts/test, scripts/demo and .ci/run: everything a fresh machine needs.
#  - a virtualenv in .venv with the package and its dev, redis and server extras;
#  - redis-server (installed with apt-get when missing, started on 127.0.0.1:6379).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

_pick_python() {
    for candidate in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "layercode-asgi needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$(_pick_python)" -m venv .venv
fi

stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "==> installing layercode-asgi[dev,redis,server] into .venv"
    # The pip index here prints a harmless warning per package; keep real errors visible.
    .venv/bin/python -m pip install -q -e ".[dev,redis,server]" 2> >(grep -v "is ignored: it is neither" >&2)
    rm -f .venv/.installed-*
    touch "$stamp"
fi

if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing redis-server"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
        echo "redis-server is missing; install it (e.g. 'sudo apt-get install redis-server')" >&2
        exit 1
    fi
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "==> starting redis-server on 127.0.0.1:6379"
    redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save "" --appendonly no >/dev/null
    for _ in $(seq 50); do
        redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break
        sleep 0.1
    done
fi
