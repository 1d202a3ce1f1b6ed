# Shared shell helpers for ISH Gateway scripts. Source it; do not run it.
# shellcheck shell=bash

ISHGW_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export ISHGW_ROOT

log() { printf '%s [ishgw] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# ensure_apt_packages PKG...: install what is missing, once.
ensure_apt_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing apt packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts its own nginx on port 80; the gateway runs its own master, so keep the system one off.
    if printf '%s\n' "${missing[@]}" | grep -qx nginx; then
        as_root systemctl disable --now nginx >/dev/null 2>&1 || as_root service nginx stop >/dev/null 2>&1 || true
        as_root pkill -f 'nginx: master process /usr/sbin/nginx' >/dev/null 2>&1 || true
    fi
}

# ensure_venv EXTRAS [SUPERSET...]: a virtualenv at $ISHGW_VENV (default .venv) with the project installed
# with EXTRAS; an install with one of the SUPERSET extras (which include EXTRAS) counts as well.
ensure_venv() {
    local extras="${1:-}" venv="${ISHGW_VENV:-$ISHGW_ROOT/.venv}" stamp candidate
    local python="${ISHGW_PYTHON:-python3}"
    if [ ! -x "$venv/bin/python" ]; then
        log "creating virtualenv $venv"
        "$python" -m venv "$venv" || die "python3 -m venv failed (apt-get install python3-venv)"
    fi
    stamp="$venv/.ishgw-installed${extras:+-$extras}"
    for candidate in "${@:2}"; do
        if [ -f "$venv/.ishgw-installed-$candidate" ] && [ ! "$ISHGW_ROOT/pyproject.toml" -nt "$venv/.ishgw-installed-$candidate" ]; then
            stamp="$venv/.ishgw-installed-$candidate"
        fi
    done
    if [ ! -f "$stamp" ] || [ "$ISHGW_ROOT/pyproject.toml" -nt "$stamp" ]; then
        log "installing the project into $venv${extras:+ (with $extras)}"
        "$venv/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
        "$venv/bin/pip" install -q -e "$ISHGW_ROOT${extras:+[$extras]}" 2>&1 | grep -v '^WARNING: Location' >&2 || true
        "$venv/bin/python" -c 'import control_plane' || die "installing the project failed"
        touch "$stamp"
        # With extras the project itself is installed too: a later ensure_venv "" (the deploy tests run
        # deploy-load-balancer.sh on this venv) has nothing to do, instead of a pip install inside a test.
        [ -z "$extras" ] || touch "$venv/.ishgw-installed"
    fi
    ISHGW_VENV="$venv"
    export ISHGW_VENV
}

# client_host ADDRESS: where a local client connects to reach a listener bound to ADDRESS.
client_host() {
    local host="${1#[}"
    host="${host%]}"
    case "$host" in
        "" | "0.0.0.0" | "*") echo "127.0.0.1" ;;
        "::") echo "[::1]" ;;
        *:*) echo "[$host]" ;;
        *) echo "$host" ;;
    esac
}

# shellcheck disable=SC2034 # used by the scripts that source this file
# The request path: Debian's lua-nginx-module (with the NDK it needs), lua-cjson, lua-resty-core (which the
# module requires) and lua-resty-lrucache.
RUNTIME_APT_PACKAGES=(nginx libnginx-mod-http-lua libnginx-mod-http-ndk lua-cjson lua-resty-core lua-resty-lrucache
    openssl ca-certificates curl python3-venv)

# now_ms: milliseconds since the epoch (EPOCHREALTIME's separator follows the locale: keep only digits).
now_ms() {
    local us="${EPOCHREALTIME//[!0-9]/}"
    echo $((us / 1000))
}

# wait_until SECONDS CMD...: poll CMD every 0.1 s until it succeeds (0) or SECONDS pass (1).
wait_until() {
    local deadline=$(($(now_ms) + ${1%.*} * 1000))
    shift
    until "$@"; do
        [ "$(now_ms)" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

# pid_alive PID: the process exists and is not a zombie (kill -0 succeeds on zombies).
pid_alive() {
    local stat
    [[ "${1:-}" =~ ^[0-9]+$ ]] || return 1
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [ "${stat%% *}" != "Z" ]
}

pid_gone() { ! pid_alive "$1"; }

# proc_cmdline PID: the command line with NULs as spaces (empty when the process is gone).
proc_cmdline() { tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" || true; }

# terminate PID NAME SECONDS [SIGNAL]: send SIGNAL (TERM), wait up to SECONDS, then SIGKILL and wait.
terminate() {
    local pid="$1" name="$2" timeout="$3" signal="${4:-TERM}"
    pid_alive "$pid" || return 0
    kill -s "$signal" "$pid" 2>/dev/null || true
    wait_until "$timeout" pid_gone "$pid" && return 0
    log "$name (pid $pid) still runs after ${timeout}s: SIGKILL"
    kill -s KILL "$pid" 2>/dev/null || true
    wait_until 5 pid_gone "$pid" || die "$name (pid $pid) survived SIGKILL"
}
