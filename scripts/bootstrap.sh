# Sourced by scripts/test, scripts/demo and .ci/run: everything a fresh machine needs.
#  - a virtualenv in .venv with the package and its dev, redis, server and docs extras;
#  - the redis-server binary (installed with apt-get when missing), for the Redis tests,
#    which start their own servers on free ports. No daemon is started here.
# `source scripts/bootstrap.sh --no-redis` skips the binary (the demo does not need it).
# Idempotent: a second run only checks. Every step says what it does as it starts.
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
    echo "==> installing layercode-asgi[dev,redis,server,docs] into .venv (first time: a minute or two)"
    # pip shows each package as it goes. The pip index here prints a harmless warning per
    # package; keep real errors visible.
    .venv/bin/python -m pip install --disable-pip-version-check -e ".[dev,redis,server,docs]" \
        2> >(grep -v "is ignored: it is neither" >&2)
    rm -f .venv/.installed-*
    touch "$stamp"
    echo "==> .venv ready"
fi

if [ "${1:-}" != "--no-redis" ] && ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing redis-server with apt-get (the binary only; no daemon is kept)"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            redis-server >/dev/null
        # Debian's package may start its service; the tests start their own servers on
        # free ports, so stop it.
        if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server; then
            systemctl stop redis-server || true
        elif [ -x /etc/init.d/redis-server ]; then
            /etc/init.d/redis-server stop >/dev/null 2>&1 || true
        fi
    else
        echo "redis-server is missing; install it (e.g. 'sudo apt-get install redis-server')" >&2
        exit 1
    fi
fi
