#!/usr/bin/env bash
# The benchmark of issue 5, one command: scripts/bench.sh [--quick] [driver options]
#
# Installs what it needs (wrk, valgrind, nginx + its Lua module from Debian; the project's virtualenv;
# LiteLLM's proxy into its own virtualenv at ${ISHGW_BENCH_LITELLM_VENV:-$HOME/.cache/ishgw-bench/litellm-venv}), then runs the
# Python driver (scripts/bench/), which measures direct / plain nginx / the gateway (TLS off and on) /
# LiteLLM on 127.0.0.1 and writes bench/results/latest.json and latest.md.
# Default run: within 15 minutes on 2 cores; --quick: within 3 (installs not counted).
# Everything started is stopped on exit, error or Ctrl-C.
set -euo pipefail
# shellcheck source=scripts/lib/functions.sh
source "$(dirname "$0")/lib/functions.sh"
cd "$ISHGW_ROOT"

quick=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        -h | --help)
            sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
    esac
done

LITELLM_VENV="${ISHGW_BENCH_LITELLM_VENV:-$HOME/.cache/ishgw-bench/litellm-venv}"
RUN_DIR="$(mktemp -d /tmp/ishgw-bench-run.XXXXXX)"
PID_FILE="$RUN_DIR/pids"
: >"$PID_FILE"
driver_pid=""

# Stop whatever the driver recorded and left running: by pid, and only if the pid still names the same
# process (its start time matches), so a recycled pid is never signalled.
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local status=$? pid start fields
    trap - EXIT INT TERM
    if [ -n "$driver_pid" ] && pid_alive "$driver_pid"; then
        terminate "$driver_pid" "benchmark driver" 30 TERM || true
    fi
    if [ -s "$PID_FILE" ]; then
        while read -r pid start; do
            pid_alive "$pid" || continue
            read -r -a fields <<<"$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null)" || continue
            [ "${fields[19]:-}" = "$start" ] || continue
            log "stopping leftover process $pid ($(proc_cmdline "$pid" | cut -c1-60))"
            terminate "$pid" "leftover $pid" 10 TERM || true
        done <"$PID_FILE"
    fi
    rm -rf "$RUN_DIR"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ensure_apt_packages "${RUNTIME_APT_PACKAGES[@]}" wrk valgrind
ensure_venv test

# LiteLLM's proxy in a virtualenv of its own: its pins must not touch the gateway's environment.
install_litellm() {
    python3 -m venv "$LITELLM_VENV" || return 1
    "$LITELLM_VENV/bin/pip" install -q --upgrade pip >"$RUN_DIR/litellm-pip.log" 2>&1 || true
    "$LITELLM_VENV/bin/pip" install -q 'litellm[proxy]' >>"$RUN_DIR/litellm-pip.log" 2>&1
}
litellm_skip=""
if [ ! -x "$LITELLM_VENV/bin/litellm" ]; then
    log "installing LiteLLM's proxy into $LITELLM_VENV (pip install 'litellm[proxy]')"
    mkdir -p "$(dirname "$LITELLM_VENV")"
    if install_litellm; then
        log "LiteLLM $("$LITELLM_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))')"
    else
        litellm_skip="pip install 'litellm[proxy]' failed: $(grep -v '^WARNING' "$RUN_DIR/litellm-pip.log" | tail -1 || true)"
        log "LiteLLM is not available; the run goes on without it ($litellm_skip)"
    fi
fi

driver_args=(--litellm-venv "$LITELLM_VENV" --pid-file "$PID_FILE")
[ -n "$litellm_skip" ] && driver_args+=(--skip-litellm "$litellm_skip")

# Hard stop well past the driver's own time budget (it budgets 170 s / 840 s and skips what does not fit).
limit=1080
[ "$quick" -eq 1 ] && limit=300
log "running the benchmark ($([ "$quick" -eq 1 ] && echo quick || echo full) mode; hard limit ${limit}s)"
PYTHONPATH="$ISHGW_ROOT${PYTHONPATH:+:$PYTHONPATH}" \
    timeout --signal=TERM --kill-after=30 "$limit" \
    "$ISHGW_VENV/bin/python" -m scripts.bench "$@" "${driver_args[@]}" &
driver_pid=$!
status=0
wait "$driver_pid" || status=$?
driver_pid=""
exit "$status"
