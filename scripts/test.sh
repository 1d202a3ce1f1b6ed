#!/usr/bin/env bash
# Run the whole test suite: installs what it needs (apt packages, a virtualenv), then lint, types, tests.
# Extra arguments go to pytest (e.g. scripts/test.sh -k weighted).
set -euo pipefail
# shellcheck source=scripts/lib/functions.sh
source "$(dirname "$0")/lib/functions.sh"
cd "$ISHGW_ROOT"

# luajit2, lua-busted, lua-check: the Lua request path's pure modules (nginx/lua/), tested outside nginx
# under OpenResty's LuaJIT, the one Debian's libnginx-mod-http-lua prefers. Not Debian's `luajit`: it
# conflicts with luajit2 and installing it would swap nginx's LuaJIT for the upstream one.
# prometheus: promtool checks compose/prometheus and a live Prometheus scrapes a gateway
# (tests/integration/test_prometheus.py). chromium: the status page is tested in a real headless browser
# (tests/browser/).
ensure_apt_packages "${RUNTIME_APT_PACKAGES[@]}" postgresql certbot pebble sslscan luajit2 lua-busted lua-check \
    prometheus chromium
ensure_venv test

log "ruff"
"$ISHGW_VENV/bin/ruff" check .
"$ISHGW_VENV/bin/ruff" format --check .
log "mypy"
# The controller, the benchmark and the tests, by package, all strict (pyproject.toml).
"$ISHGW_VENV/bin/mypy" -p control_plane -p scripts.bench -p tests
log "luacheck"
luacheck --no-color -q nginx/lua tests/unit/lua_body_driver.lua
log "busted (LuaJIT, .busted)"
busted --output=plainTerminal
# pytest exits 5 when it collected nothing: that is a failure here, as is any other non-zero code.
# -rA: a summary line for every outcome (a failure's reason without scrolling back); --durations: the slowest.
# A failing integration test's report also carries its gateways' controller and nginx error log tails
# (tests/conftest.py).
PYTEST=("$ISHGW_VENV/bin/pytest" -q -p no:cacheprovider -rA --durations=15)
if [ "$#" -gt 0 ]; then
    log "pytest $*"
    exec "${PYTEST[@]}" "$@"
fi
# The whole suite as two streams at once: the host-level tests (the deploy script, containers, a browser:
# mostly waiting on processes they start) and the integration tests that mostly wait on clocks (limits over
# real minutes, learned weights, scaling cooldowns) beside the rest. Each stream alone is serial; together
# they keep both cores busy and take about as long as each other. Nothing is shared between them: ports from
# blocks of their own (tests/ports.py), temporary homes, a private container engine, the README's run in a
# network namespace of its own.
HOST_LEVEL=(
    tests/deploy tests/compose tests/browser
    tests/integration/test_limits.py tests/integration/test_routing.py tests/integration/test_scaling.py
)
host_log="$(mktemp "${TMPDIR:-/tmp}/ishgw-host-tests.XXXXXX")"
log "pytest: ${HOST_LEVEL[*]} (in the background, its report below) and everything else"
"${PYTEST[@]}" "${HOST_LEVEL[@]}" >"$host_log" 2>&1 &
host_pid=$!
rest=0
"${PYTEST[@]}" tests "${HOST_LEVEL[@]/#/--ignore=}" || rest=$?
host=0
wait "$host_pid" || host=$?
log "pytest ${HOST_LEVEL[*]}"
cat "$host_log"
rm -f "$host_log"
log "pytest exit codes: host-level $host, the rest $rest"
[ "$host" -eq 0 ] && [ "$rest" -eq 0 ]
