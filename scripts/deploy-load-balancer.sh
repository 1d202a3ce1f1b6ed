#!/usr/bin/env bash
# ISH Gateway on this host: the controller (admin API, reconcile loop) and the nginx it drives.
#
#   scripts/deploy-load-balancer.sh deploy        install what is missing, start or update; idempotent
#   scripts/deploy-load-balancer.sh deploy --systemd   the same, run by systemd (ish-gateway.service + renewal timer)
#   scripts/deploy-load-balancer.sh stop          stop the controller, then nginx (graceful)
#   scripts/deploy-load-balancer.sh restart       stop + deploy
#   scripts/deploy-load-balancer.sh status        components, configuration and pools; non-zero when down
#   scripts/deploy-load-balancer.sh logs [-f] [-n N]   controller log and nginx error log
#   scripts/deploy-load-balancer.sh update        after a git pull: packages if their lists changed, migrate, restart the controller
#   scripts/deploy-load-balancer.sh backup [--with-secrets] [FILE]   snapshot of the running gateway (tar.gz, 0600)
#   scripts/deploy-load-balancer.sh restore FILE  verify, stop the controller, restore, start (nginx keeps serving)
#   scripts/deploy-load-balancer.sh clean [--yes] stop, then remove everything under ISHGW_HOME
#   scripts/deploy-load-balancer.sh help
set -euo pipefail

# The caller's ISHGW_* variables, taken before functions.sh and ensure_venv export their own.
declare -A CALLER_ENV=()
while IFS= read -r _name; do
    CALLER_ENV[$_name]="${!_name}"
done < <(compgen -e ISHGW_ || true)

# shellcheck source=scripts/lib/functions.sh
source "$(dirname "$0")/lib/functions.sh"

PROG="scripts/deploy-load-balancer.sh"
DEFAULT_HOME="/var/lib/ish-gateway"
START_TIMEOUT="${ISHGW_START_TIMEOUT:-60}"
STOP_TIMEOUT="${ISHGW_STOP_TIMEOUT:-30}"
# The controller runs with exactly gateway.env (+ provider.env) and this PATH: nothing leaks in from the
# shell that happened to run deploy, and "same settings" can be checked against /proc/PID/environ.
CONTROLLER_PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Knobs of this script only: never persisted, never passed to the controller.
SCRIPT_ONLY=(ISHGW_ROOT ISHGW_PYTHON ISHGW_START_TIMEOUT ISHGW_STOP_TIMEOUT ISHGW_CERT_RENEW_DAYS ISHGW_SYSTEMD_DIR)
# Settings this script reads besides the controller's own (Settings in control_plane/settings.py).
SCRIPT_SETTINGS=(ISHGW_VENV)

usage() {
    sed -n '2,14s/^# \{0,1\}//p' "$0"
    cat <<EOF

Settings (environment variables; deploy stores the effective ones in \$ISHGW_HOME/gateway.env, mode 0600,
and every later command reads them from there, so nothing has to be exported again):
  ISHGW_HOME           $DEFAULT_HOME                 state: database, nginx tree, certificates, logs
  ISHGW_HTTP_PORT      8080                                 HTTP listener (address: ISHGW_LISTEN_ADDRESS=0.0.0.0)
  ISHGW_HTTPS_PORT     8443                                 HTTPS listener; 0 switches HTTPS off
  ISHGW_ADMIN_LISTEN   127.0.0.1:9000                       admin API; HTTPS only beyond loopback
  ISHGW_LOG_LISTEN     unix:\$ISHGW_HOME/run/log.sock        nginx's access log stream to the controller: a unix
                                                            datagram socket only the nginx workers may write to,
                                                            or 127.0.0.1:PORT (UDP: any local user can write to it)
  ISHGW_MAX_RETRY_AFTER_S 300                               longest rate limit a provider's Retry-After sets
  ISHGW_ADMIN_API_KEY  generated                            unset: created once in \$ISHGW_HOME/secrets/admin_api_key
  ISHGW_DB_URL         sqlite:///\$ISHGW_HOME/ishgw.db       or postgresql+psycopg://user:pass@host/db
  ISHGW_NGINX_USER     www-data when run as root            user of the nginx worker processes; only its group
                                                            may reach \$ISHGW_HOME/run (the unix sockets)
  ISHGW_VENV           <repo>/.venv                         virtualenv the controller runs from
  ISHGW_DOMAIN         (none)                               names clients use (comma separated): extra names for the
                                                            self-signed certificate, the only HTTP->HTTPS redirect targets
  ISHGW_FORWARD_CLIENT_IP true                              providers get X-Forwarded-For/X-Real-IP (the address nginx
                                                            sees); false: neither
  ISHGW_HTTP_REDIRECT  auto                                 plain HTTP -> HTTPS: auto (only once the certificate is
                                                            one clients can verify, e.g. Let's Encrypt; with the
                                                            self-signed default HTTP serves the API), true, false
  ISHGW_KEY_DEFAULT_RPM 0                                   rate of client keys created without rpm_limit (0: none)
  ISHGW_SCALING_COMMANDS (none)                            programs scaling groups may start (absolute paths, comma
                                                            separated); empty: the command driver starts nothing
  ISHGW_SCALING_IMAGES (none)                              images scaling groups of driver docker may start (exact
                                                            references, comma separated); empty: none
  ISHGW_DOCKER_HOST unix:///var/run/docker.sock            the Docker Engine API socket of the docker driver (or
                                                            the socket of podman's system service)
  ISHGW_METRICS_KEY_LABEL false                             add a key label to ishgw_tokens_total / ishgw_cost_usd_total
  ISHGW_ALERT_WEBHOOK_URLS (none)                           alert webhooks (comma separated http(s) URLs): JSON with a
                                                            Slack-compatible "text"
  ISHGW_ALERT_SMTP_HOST (none)  ISHGW_ALERT_SMTP_PORT 587   alert e-mail server; also ISHGW_ALERT_SMTP_USER,
                                                            ISHGW_ALERT_SMTP_PASSWORD, ISHGW_ALERT_SMTP_STARTTLS (true),
                                                            ISHGW_ALERT_SMTP_FROM (ish-gateway@localhost)
  ISHGW_ALERT_EMAIL_TO (none)                               alert e-mail recipients (comma separated)
  ISHGW_ALERT_RATE_PER_MIN 20                               alerts sent per minute (bursts of 10); ISHGW_ALERT_RETRIES 5
                                                            retries with backoff; ISHGW_ALERT_INTERVAL_S 1 evaluation
                                                            interval; ISHGW_ALERT_CERTIFICATE_DAYS 14
  ISHGW_ADMIN_SESSION_TTL_S 28800                           status page (GET / on the admin listener): a login lasts this long
  ISHGW_STATUS_REFRESH_S 5                                  status page: seconds between two refreshes of its figures
  ISHGW_USAGE_ACCOUNTING true                               token usage counted in nginx per key, instance and model;
                                                            false switches it off
  ISHGW_STREAM_USAGE   on                                   OpenAI streams that did not ask for usage are asked for it
                                                            (the usage is taken back out of the answer); off: estimated
  ISHGW_ADMIN_MAX_BODY_MB 64                                largest body of a configuration import or migration
                                                            (10,000 instances: a few MB); other admin bodies: 1 MiB
  Every other ISHGW_* setting of the controller (see README.md) is passed through and stored the same way.
  A variable set to the empty string drops a stored value (back to the default).
  Provider credentials referenced as env:NAME are read from \$ISHGW_HOME/provider.env (NAME=value lines, 0600;
  only the names defined there, never ISHGW_*); those referenced as file:/path must lie inside ISHGW_SECRET_DIRS
  (comma separated, default \$ISHGW_HOME/secrets/providers, mode 0700).

Backups (backup/restore; README "Backup and restore"):
  ISHGW_REGISTRY_KEY_FILE \$ISHGW_HOME/secrets/registry.key  AES-256 key that encrypts provider keys in the registry
                                                            (created 0600 on first start); keep a copy apart
  ISHGW_BACKUP_INTERVAL_H 0                                 hours between backups the controller makes into
                                                            \$ISHGW_HOME/backups (without secrets); 0: none
  ISHGW_BACKUP_KEEP    7                                    periodic backups kept (the oldest go first)
  backup FILE defaults to \$ISHGW_HOME/backups/manual-<time>.tar.gz; --with-secrets adds the registry key, the
  admin key, provider.env and secrets/providers/. restore of a backup without secrets needs the registry key
  already in place and says so before it changes anything. clean asks for confirmation (--yes for scripts).

Timeouts of this script (not stored): ISHGW_START_TIMEOUT=$START_TIMEOUT s, ISHGW_STOP_TIMEOUT=$STOP_TIMEOUT s.
deploy --systemd installs compose/systemd/ish-gateway.service (the controller; nginx its child; Restart=on-failure;
hardened) and ish-gateway-renew.service + .timer (the self-signed certificate) into ISHGW_SYSTEMD_DIR (not stored;
default /etc/systemd/system), enables them and lets systemd run the controller instead of a detached process.
It needs systemd as PID 1 (else it says so, leaves the units written and starts nothing).
status exits 0 when everything runs, 1 when a component is down, 2 when the last reload failed (nginx serves
the previous configuration), 3 when nothing runs.
EOF
}

# --- settings -------------------------------------------------------------------------------------------

declare -A CFG=()

is_script_only() {
    local name
    for name in "${SCRIPT_ONLY[@]}"; do [ "$name" = "$1" ] && return 0; done
    return 1
}

# read_env_file FILE ARRAY_NAME PATTERN: NAME=value lines (no quoting, as docker --env-file) into the array.
# shellcheck disable=SC2034 # `into` is a nameref: assigning it fills the caller's array
read_env_file() {
    local file="$1" pattern="$3" line name
    local -n into="$2"
    [ -f "$file" ] || return 0
    while IFS= read -r line || [ -n "$line" ]; do
        [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
        name="${line%%=*}"
        [[ "$line" == *=* && "$name" =~ $pattern ]] || die "$file: cannot parse line: ${line:0:40}"
        into["$name"]="${line#*=}"
    done <"$file"
}

# overlay ARRAY_NAME: the caller's environment on top of CFG; an empty value drops the setting.
overlay_caller_env() {
    local name
    for name in "${!CALLER_ENV[@]}"; do
        is_script_only "$name" && continue
        if [ -z "${CALLER_ENV[$name]}" ]; then unset "CFG[$name]"; else CFG[$name]="${CALLER_ENV[$name]}"; fi
    done
}

# load_settings deploy|read: deploy lets the caller's environment override gateway.env (that is how settings
# change); the other commands trust gateway.env, which describes what was started.
load_settings() {
    local mode="$1" name
    CFG=()
    HOME_DIR="$(realpath -m "${CALLER_ENV[ISHGW_HOME]:-$DEFAULT_HOME}")"
    GATEWAY_ENV="$HOME_DIR/gateway.env"
    if [ "$mode" = deploy ]; then
        read_env_file "$GATEWAY_ENV" CFG '^ISHGW_[A-Z0-9_]+$'
        overlay_caller_env
    else
        overlay_caller_env
        read_env_file "$GATEWAY_ENV" CFG '^ISHGW_[A-Z0-9_]+$'
    fi
    CFG[ISHGW_HOME]="$HOME_DIR"
    : "${CFG[ISHGW_HTTP_PORT]:=8080}"
    : "${CFG[ISHGW_HTTPS_PORT]:=8443}"
    : "${CFG[ISHGW_ADMIN_LISTEN]:=127.0.0.1:9000}"
    : "${CFG[ISHGW_DB_URL]:=sqlite:///$HOME_DIR/ishgw.db}"
    : "${CFG[ISHGW_VENV]:=$ISHGW_ROOT/.venv}"
    if [ "$(id -u)" -eq 0 ]; then : "${CFG[ISHGW_NGINX_USER]:=www-data}"; fi
    for name in "${!CFG[@]}"; do
        [[ "${CFG[$name]}" != *$'\n'* ]] || die "$name must not contain a newline"
    done
    valid_port "${CFG[ISHGW_HTTP_PORT]}" 1 || die "ISHGW_HTTP_PORT must be a port number (1-65535)"
    valid_port "${CFG[ISHGW_HTTPS_PORT]}" 0 || die "ISHGW_HTTPS_PORT must be a port number, or 0 for no HTTPS"
    if ! [[ "${CFG[ISHGW_ADMIN_LISTEN]}" =~ ^(.+):([0-9]+)$ ]] || ! valid_port "${BASH_REMATCH[2]}" 1; then
        die "ISHGW_ADMIN_LISTEN must be HOST:PORT (e.g. 127.0.0.1:9000)"
    fi

    PYTHON="${CFG[ISHGW_VENV]}/bin/python"
    CONTROLLER_PID_FILE="$HOME_DIR/controller.pid"
    CONTROLLER_LOG="$HOME_DIR/logs/controller.log"
    NGINX_PREFIX="$HOME_DIR/nginx"
    NGINX_PID_FILE="$NGINX_PREFIX/nginx.pid"
    NGINX_ERROR_LOG="$NGINX_PREFIX/logs/error.log"
    KEY_FILE="$HOME_DIR/secrets/admin_api_key"
    PROVIDER_ENV="$HOME_DIR/provider.env"
    local admin_host="${CFG[ISHGW_ADMIN_LISTEN]%:*}"
    ADMIN_URL="$(admin_scheme "$admin_host")://$(client_host "$admin_host"):${CFG[ISHGW_ADMIN_LISTEN]##*:}"
    local gw_host
    gw_host="$(client_host "${CFG[ISHGW_LISTEN_ADDRESS]:-0.0.0.0}")"
    HTTP_URL="http://$gw_host:${CFG[ISHGW_HTTP_PORT]}"
    HTTPS_URL="https://$gw_host:${CFG[ISHGW_HTTPS_PORT]}"
    TLS_CERT="${CFG[ISHGW_TLS_CERT]:-$HOME_DIR/ssl/cert.pem}"
    TLS_KEY="${CFG[ISHGW_TLS_KEY]:-$HOME_DIR/ssl/key.pem}"
}

valid_port() { [[ "$1" =~ ^[0-9]{1,5}$ ]] && [ "$1" -ge "$2" ] && [ "$1" -le 65535 ]; }

# admin_scheme HOST: the controller serves the admin API over TLS beyond loopback or with ISHGW_ADMIN_TLS=true
# (control_plane/admin_tls.py).
admin_scheme() {
    local host="${1#[}"
    host="${host%]}"
    case "${CFG[ISHGW_ADMIN_TLS]:-}" in
        true | True | 1 | yes | on) echo https; return ;;
        false | False | 0 | no | off) echo http; return ;;
    esac
    case "$host" in
        127.* | ::1 | localhost) echo http ;;
        *) echo https ;;
    esac
}

tls_enabled() { [ "${CFG[ISHGW_HTTPS_PORT]}" != 0 ] && [ -f "$TLS_CERT" ] && [ -f "$TLS_KEY" ]; }

# gateway.env: sorted NAME=value lines, written atomically (0600) and only when the content changes.
write_gateway_env() {
    local tmp name
    tmp="$(mktemp "$HOME_DIR/.gateway.env.XXXXXX")"
    TEMP_FILES+=("$tmp")
    {
        echo "# ISH Gateway settings, written by $PROG deploy. The controller runs with exactly these"
        echo "# variables. Change a setting: export it (or edit this file), then run deploy again."
        for name in $(printf '%s\n' "${!CFG[@]}" | sort); do
            printf '%s=%s\n' "$name" "${CFG[$name]}"
        done
    } >"$tmp"
    chmod 0600 "$tmp"
    if cmp -s "$tmp" "$GATEWAY_ENV"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$GATEWAY_ENV"
        log "settings written to $GATEWAY_ENV"
    fi
}

# provider.env: credentials that instances reference as env:NAME (the controller sees no other environment).
declare -A PROVIDER=()
load_provider_env() {
    local name
    PROVIDER=()
    [ -f "$PROVIDER_ENV" ] || return 0
    [ "$(stat -c %a "$PROVIDER_ENV")" = 600 ] || log "warning: $PROVIDER_ENV holds secrets: chmod 0600 it"
    read_env_file "$PROVIDER_ENV" PROVIDER '^[A-Za-z_][A-Za-z0-9_]*$'
    for name in "${!PROVIDER[@]}"; do
        if [[ "$name" == ISHGW_* || "$name" == PATH || "$name" == LANG ]]; then
            die "$PROVIDER_ENV: $name is not a provider credential (ISHGW_* settings belong in gateway.env)"
        fi
    done
}

# controller_env: the complete environment of the controller, one NAME=value a line, sorted.
controller_env() {
    local name
    {
        echo "PATH=$CONTROLLER_PATH"
        echo "LANG=C.UTF-8"
        for name in "${!PROVIDER[@]}"; do printf '%s=%s\n' "$name" "${PROVIDER[$name]}"; done
        for name in "${!CFG[@]}"; do printf '%s=%s\n' "$name" "${CFG[$name]}"; done
    } | LC_ALL=C sort
}

warn_unknown_settings() {
    local known name
    known="$("$PYTHON" -c 'from control_plane.settings import Settings
print("\n".join("ISHGW_" + name.upper() for name in Settings.model_fields))')" || return 0
    for name in "${!CFG[@]}"; do
        if ! grep -qxF "$name" <<<"$known" && [[ " ${SCRIPT_SETTINGS[*]} " != *" $name "* ]]; then
            log "warning: $name is not a gateway setting (a typo?); it is stored but nothing reads it"
        fi
    done
}

# --- processes (everything scoped by this home: several gateways may share a host) ----------------------

is_our_controller() {
    pid_alive "$1" && [[ "$(proc_cmdline "$1")" == *" -m control_plane"* ]] \
        && grep -qzxF "ISHGW_HOME=$HOME_DIR" "/proc/$1/environ" 2>/dev/null
}

is_our_nginx() {
    local cmdline
    cmdline="$(proc_cmdline "$1")"
    pid_alive "$1" && [[ "$cmdline" == *"master process"* && "$cmdline" == *" -p $NGINX_PREFIX/ "* ]]
}

# find_pid PIDFILE PREDICATE NEEDLE: the pid from the file when PREDICATE holds for it, else the first process
# whose command line contains NEEDLE and passes PREDICATE (a lost or stale pid file must not hide a process).
find_pid() {
    local pid candidate
    pid="$(cat "$1" 2>/dev/null || true)"
    if [[ "$pid" =~ ^[0-9]+$ ]] && "$2" "$pid"; then
        echo "$pid"
        return 0
    fi
    while IFS=/ read -r _ _ candidate _; do
        if "$2" "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done < <(grep -alF -- "$3" /proc/[0-9]*/cmdline 2>/dev/null)
    return 1
}

controller_pid() { find_pid "$CONTROLLER_PID_FILE" is_our_controller control_plane; }
nginx_pid() { find_pid "$NGINX_PID_FILE" is_our_nginx "$NGINX_PREFIX/"; }

nginx_workers() { ps --ppid "$1" -o pid=,args= 2>/dev/null | awk '/worker process/ {print $1}'; }

# --- probes ---------------------------------------------------------------------------------------------

http_get() { curl -fsS --noproxy '*' --max-time 2 -H 'Connection: close' "$@" 2>/dev/null; }
# The admin certificate is the gateway's (often self-signed) and names no loopback address: -k for HTTPS.
admin_http_get() { if [[ "$ADMIN_URL" == https://* ]]; then http_get -k "$@"; else http_get "$@"; fi; }
admin_healthy() { admin_http_get -o /dev/null "$ADMIN_URL/admin/health"; }
gateway_healthy() {
    http_get -o /dev/null "$HTTP_URL/health" || return 1
    if tls_enabled; then http_get -k -o /dev/null "$HTTPS_URL/health" || return 1; fi
}

admin_key() {
    if [ -n "${CFG[ISHGW_ADMIN_API_KEY]:-}" ]; then
        printf '%s' "${CFG[ISHGW_ADMIN_API_KEY]}"
    else
        tr -d '\n' <"$KEY_FILE" 2>/dev/null
    fi
}

# admin_get PATH: GET an authenticated admin endpoint; the key goes through stdin, never through argv.
admin_get() {
    local key
    key="$(admin_key)" || return 1
    printf 'X-Admin-API-Key: %s\n' "$key" | admin_http_get -H @- "$ADMIN_URL$1"
}

show_log_tail() {
    local file
    for file in "$CONTROLLER_LOG" "$NGINX_ERROR_LOG"; do
        [ -s "$file" ] || continue
        log "last lines of $file:"
        tail -n 15 "$file" | sed 's/^/    /' >&2
    done
}

# --- controller -----------------------------------------------------------------------------------------

# systemd adds these to every service's environment: not settings.
SYSTEMD_ENV='^(INVOCATION_ID|SYSTEMD_EXEC_PID|JOURNAL_STREAM|NOTIFY_SOCKET|MANAGERPID|MAINPID|SERVICE_RESULT)='
same_settings() {
    [ "$(tr '\0' '\n' <"/proc/$1/environ" 2>/dev/null | grep -Ev "$SYSTEMD_ENV" | LC_ALL=C sort)" = "$(controller_env)" ]
}

# port_free PORT: nothing listens on PORT (any address). Used only before a fresh start.
port_free() { [ -z "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }

check_ports_free() {
    local i port names=("admin API" "HTTP" "HTTPS") ports=("${CFG[ISHGW_ADMIN_LISTEN]##*:}")
    if ! nginx_pid >/dev/null; then
        ports+=("${CFG[ISHGW_HTTP_PORT]}")
        tls_enabled && ports+=("${CFG[ISHGW_HTTPS_PORT]}")
    fi
    for i in "${!ports[@]}"; do
        port="${ports[$i]}"
        port_free "$port" || die "port $port (${names[$i]}) is in use by another program: $(ss -Hltnp "sport = :$port" | head -n 1)"
    done
}

# note MESSAGE: a line in the controller log, so the log tells when deploy started or stopped it.
note() { printf '%s [deploy] %s\n' "$(date -u +%FT%TZ)" "$1" 2>/dev/null >>"$CONTROLLER_LOG" || true; }

start_controller() {
    local pid env_lines
    mapfile -t env_lines < <(controller_env)
    (umask 027 && mkdir -p "$HOME_DIR/logs" && touch "$CONTROLLER_LOG")
    log "starting the controller (log: $CONTROLLER_LOG)"
    note "starting the controller"
    (
        cd "$HOME_DIR"
        exec 9>&- # the deploy lock stays with this script
        umask 022 # the controller sets the modes of its secrets itself; nginx workers must read the rest
        exec env -i "${env_lines[@]}" setsid "$PYTHON" -m control_plane </dev/null >>"$CONTROLLER_LOG" 2>&1
    ) &
    pid=$!
    TEMP_FILES+=("$CONTROLLER_PID_FILE.tmp")
    echo "$pid" >"$CONTROLLER_PID_FILE.tmp"
    mv -f "$CONTROLLER_PID_FILE.tmp" "$CONTROLLER_PID_FILE"
    # setsid execs in place (the child is no process group leader), so $! is the controller itself.
    wait_until 5 is_our_controller "$pid" || { show_log_tail; die "the controller did not start"; }
}

stop_controller() {
    local pid
    if pid="$(controller_pid)"; then
        log "stopping the controller (pid $pid)"
        note "stopping the controller (pid $pid)"
        terminate "$pid" controller "$STOP_TIMEOUT" TERM
    else
        log "controller: not running"
    fi
    rm -f "$CONTROLLER_PID_FILE"
}

stop_nginx() {
    local pid workers worker
    if ! pid="$(nginx_pid)"; then
        log "nginx: not running"
        return 0
    fi
    workers="$(nginx_workers "$pid")"
    log "stopping nginx (master pid $pid): in-flight requests may finish for up to ${STOP_TIMEOUT}s"
    kill -s QUIT "$pid" 2>/dev/null || true # what `nginx -s quit` sends
    if ! wait_until "$STOP_TIMEOUT" pid_gone "$pid"; then
        log "nginx did not quit gracefully: fast shutdown"
        terminate "$pid" "nginx master" 5 TERM
    fi
    for worker in $workers; do
        if pid_alive "$worker" && [[ "$(proc_cmdline "$worker")" == *"nginx: worker process"* ]]; then
            terminate "$worker" "nginx worker" 2 KILL
        fi
    done
}

wait_ready() {
    local deadline=$(($(now_ms) + START_TIMEOUT * 1000))
    until admin_healthy && gateway_healthy; do
        if ! controller_pid >/dev/null; then
            show_log_tail
            die "the controller exited during startup"
        fi
        if [ "$(now_ms)" -ge "$deadline" ]; then
            show_log_tail
            die "not healthy after ${START_TIMEOUT}s (admin $ADMIN_URL/admin/health, gateway $HTTP_URL/health)"
        fi
        sleep 0.1
    done
}

# --- commands -------------------------------------------------------------------------------------------

TEMP_FILES=()
cleanup() { [ "${#TEMP_FILES[@]}" -eq 0 ] || rm -f "${TEMP_FILES[@]}"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# take_lock: one deploy/stop at a time per home (released when this script exits).
take_lock() {
    exec 9>"$HOME_DIR/.deploy.lock"
    flock -w "$START_TIMEOUT" 9 || die "another deploy or stop of $HOME_DIR is still running"
}

# --- systemd (deploy --systemd) ------------------------------------------------------------------------

SYSTEMD_UNITS=(ish-gateway.service ish-gateway-renew.service ish-gateway-renew.timer)
systemd_runs() { [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; }
# unit_active: ish-gateway.service runs, and for this home (several gateways may share a host).
unit_active() {
    systemd_runs && systemctl is-active --quiet ish-gateway.service 2>/dev/null \
        && [ "$(systemctl show -p WorkingDirectory --value ish-gateway.service 2>/dev/null)" = "$HOME_DIR" ]
}

# install_units: the templates of compose/systemd/ with this home's paths, into ISHGW_SYSTEMD_DIR; sets
# UNITS_CHANGED=1 when a file changed. Paths reach the units unquoted: only plain path characters pass.
install_units() {
    local dir="${ISHGW_SYSTEMD_DIR:-/etc/systemd/system}" unit tmp path
    for path in "$HOME_DIR" "$ISHGW_ROOT" "${CFG[ISHGW_VENV]}"; do
        [[ "$path" =~ ^/[A-Za-z0-9/._+-]*$ ]] || die "deploy --systemd: $path: only letters, digits and /._+- in paths"
    done
    mkdir -p "$dir"
    UNITS_CHANGED=0
    for unit in "${SYSTEMD_UNITS[@]}"; do
        tmp="$(mktemp "$dir/.$unit.XXXXXX")"
        TEMP_FILES+=("$tmp")
        sed -e "s|@ISHGW_HOME@|$HOME_DIR|g" -e "s|@ISHGW_ROOT@|$ISHGW_ROOT|g" -e "s|@ISHGW_VENV@|${CFG[ISHGW_VENV]}|g" \
            "$ISHGW_ROOT/compose/systemd/$unit" >"$tmp"
        chmod 0644 "$tmp"
        if cmp -s "$tmp" "$dir/$unit"; then
            rm -f "$tmp"
        else
            mv -f "$tmp" "$dir/$unit"
            UNITS_CHANGED=1
            log "wrote $dir/$unit"
        fi
    done
}

# deploy_systemd REASON: systemd runs the controller (a detached one is stopped first; nginx keeps serving
# and the unit's controller adopts it).
deploy_systemd() {
    local reason="$1" pid
    install_units
    if ! systemd_runs; then
        die "deploy --systemd: systemd is not running as PID 1 on this host (PID 1 is $(cat /proc/1/comm 2>/dev/null || echo unknown)):" \
            "the units are written to ${ISHGW_SYSTEMD_DIR:-/etc/systemd/system} but nothing was started or enabled." \
            "Run deploy without --systemd here (a detached controller), or on a host booted with systemd."
    fi
    [ "${ISHGW_SYSTEMD_DIR:-/etc/systemd/system}" = /etc/systemd/system ] \
        || die "deploy --systemd: systemd only runs units from /etc/systemd/system (ISHGW_SYSTEMD_DIR is for tests)"
    if pid="$(controller_pid)" && [ "$(systemctl show -p MainPID --value ish-gateway.service)" != "$pid" ]; then
        log "a detached controller runs (pid $pid): systemd takes over"
        stop_controller
    fi
    (umask 027 && mkdir -p "$HOME_DIR/logs" && touch "$CONTROLLER_LOG")
    systemctl daemon-reload
    systemctl enable --quiet ish-gateway.service ish-gateway-renew.timer
    systemctl start ish-gateway-renew.timer
    if [ -n "$reason" ] || [ "$UNITS_CHANGED" -eq 1 ]; then
        log "${reason:-units changed}: (re)starting ish-gateway.service"
        systemctl restart ish-gateway.service
    else
        systemctl start ish-gateway.service
    fi
}

cmd_deploy() {
    local pid="" reason="" cert_created=0
    load_settings deploy
    load_provider_env
    mkdir -p "$HOME_DIR" 2>/dev/null || die "cannot create $HOME_DIR (run as root, or set ISHGW_HOME)"
    chmod 0711 "$HOME_DIR" # traversable by the nginx workers; what is secret below it is 0600/0700
    take_lock

    ensure_apt_packages "${RUNTIME_APT_PACKAGES[@]}"
    ISHGW_VENV="${CFG[ISHGW_VENV]}"
    ensure_venv clients test # the SDKs the README shows; the test install has them too
    warn_unknown_settings

    if [ -n "${CFG[ISHGW_TLS_CERT]:-}${CFG[ISHGW_TLS_KEY]:-}" ] && ! tls_enabled && [ "${CFG[ISHGW_HTTPS_PORT]}" != 0 ]; then
        die "ISHGW_TLS_CERT/ISHGW_TLS_KEY: $TLS_CERT and $TLS_KEY must both exist (or set ISHGW_HTTPS_PORT=0)"
    fi
    if [ "${CFG[ISHGW_HTTPS_PORT]}" != 0 ] && [ -z "${CFG[ISHGW_TLS_CERT]:-}" ] && [ ! -f "$TLS_CERT" ]; then
        ISHGW_DOMAIN="${CFG[ISHGW_DOMAIN]:-}" "$ISHGW_ROOT/ssl/generate-certs.sh" "$HOME_DIR/ssl"
        cert_created=1
    fi
    if pid="$(controller_pid)"; then
        if ! same_settings "$pid"; then
            reason="settings changed: restarting the controller (nginx keeps serving and is reloaded)"
        elif [ "$cert_created" -eq 1 ]; then
            reason="new certificate: restarting the controller so that nginx serves HTTPS"
        elif ! gateway_healthy; then
            reason="the controller runs but nginx does not answer: restarting the controller to recover it"
        fi
    elif [ "$SYSTEMD" -eq 0 ] || ! unit_active; then
        check_ports_free
    fi
    write_gateway_env # after the checks: gateway.env describes what runs
    if [ "$SYSTEMD" -eq 1 ]; then
        deploy_systemd "$reason"
    elif [ -n "$reason" ]; then
        log "$reason"
        stop_controller
        start_controller
    elif [ -n "$pid" ]; then
        log "already running with the same settings (controller pid $pid): nothing to change"
    else
        start_controller
    fi
    wait_ready

    local renew_days="${ISHGW_CERT_RENEW_DAYS:-14}"
    [[ "$renew_days" =~ ^[0-9]+$ ]] || renew_days=14
    if tls_enabled && ! openssl x509 -in "$TLS_CERT" -noout -checkend $((renew_days * 86400)) >/dev/null; then
        log "warning: the certificate $TLS_CERT expires within $renew_days days ($(openssl x509 -in "$TLS_CERT" -noout -enddate)):" \
            "renew it (Let's Encrypt: ssl/letsencrypt-setup.sh; self-signed: ssl/generate-certs.sh, then POST /admin/reload)"
    fi
    print_summary
}

# http_redirects: 0 when plain HTTP answers the API with a redirect to HTTPS (what the controller decided
# from ISHGW_HTTP_REDIRECT and the certificate; /admin/status "http").
http_redirects() {
    local json
    json="$(admin_get /admin/status 2>/dev/null)" || return 1
    "$PYTHON" -c 'import json, sys; sys.exit(0 if (json.load(sys.stdin).get("http") or {}).get("redirect") else 1)' \
        <<<"$json"
}

print_summary() {
    local key_where="$KEY_FILE"
    [ -z "${CFG[ISHGW_ADMIN_API_KEY]:-}" ] || key_where="ISHGW_ADMIN_API_KEY in $GATEWAY_ENV"
    echo "ISH Gateway is running (home $HOME_DIR)"
    if http_redirects; then
        echo "  gateway      $HTTP_URL redirects to HTTPS (ISHGW_HTTP_REDIRECT; health: $HTTP_URL/health)"
    else
        echo "  gateway      $HTTP_URL/v1  (health: $HTTP_URL/health)"
    fi
    if tls_enabled; then
        echo "  gateway TLS  $HTTPS_URL/v1  (certificate $TLS_CERT$(self_signed_hint))"
    fi
    echo "  admin API    $ADMIN_URL/admin/  (header X-Admin-API-Key)"
    echo "  status page  $ADMIN_URL/  (log in with the admin key)"
    echo "  admin key    $key_where"
    echo "  settings     $GATEWAY_ENV"
    echo "  logs         $CONTROLLER_LOG, $NGINX_ERROR_LOG"
    echo "  next         $PROG status | logs -f | stop"
}

# self_signed_hint: how clients trust the self-signed default (nothing for a CA-issued certificate).
self_signed_hint() {
    local subject issuer
    subject="$(openssl x509 -in "$TLS_CERT" -noout -subject 2>/dev/null | sed 's/^subject=//')"
    issuer="$(openssl x509 -in "$TLS_CERT" -noout -issuer 2>/dev/null | sed 's/^issuer=//')"
    if [ -n "$subject" ] && [ "$subject" = "$issuer" ]; then
        printf '; self-signed: curl --cacert %s, SSL_CERT_FILE=%s for the SDKs' "$TLS_CERT" "$TLS_CERT"
    fi
}

cmd_stop() {
    load_settings read
    if [ -d "$HOME_DIR" ]; then take_lock; fi
    if unit_active && [ -z "${SERVICE_RESULT:-}" ]; then
        # Run by systemd: stopping the unit stops the controller, then (ExecStopPost, this command again) nginx.
        log "stopping ish-gateway.service"
        exec 9>&- # the unit's ExecStopPost takes the lock
        systemctl stop ish-gateway.service
        return 0
    fi
    stop_controller # first: a running controller would start nginx again
    stop_nginx
    log "stopped (home $HOME_DIR)"
}

# The /admin/status JSON on stdin, formatted for operators; exits 2 when the last reload failed.
STATUS_FORMAT="$(
    cat <<'PY'
import json, signal, sys

signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `status | head` ends quietly
s = json.load(sys.stdin)
applied = s.get("applied") or {}
last = s.get("last_reload") or {}
inst = s.get("instances") or {}
print(f"config      checksum {s.get('checksum') or '-'}, generation {s.get('generation')}"
      f" ({applied.get('generation', '-')} applied), {inst.get('enabled', 0)} of {inst.get('total', 0)}"
      f" instances enabled, {s.get('reloads', 0)} reloads, {s.get('reload_failures', 0)} failed")
http = s.get("http") or {}
if http:
    does = "redirects to HTTPS" if http.get("redirect") else "serves the API"
    print(f"http        plain HTTP {does} (ISHGW_HTTP_REDIRECT={http.get('mode')}: {http.get('reason')})")
limits = s.get("limits") or {}
for who, values in limits.items():
    shown = ", ".join(f"{k} {v}" for k, v in values.items())
    print(f"limits      {who.replace('_', ' ')}: {shown}")
failed = bool(last) and not last.get("ok", True)
if failed:
    print(f"            LAST RELOAD FAILED at {last.get('at')}: {last.get('error')}")
    print("            nginx keeps serving the previous configuration")
pools = s.get("pools") or []
hint = "" if pools else "  (none yet: register instances with POST /admin/instances)"
print(f"pools       {len(pools)}{hint}")
for p in pools:
    names = p.get("instances") or []
    print(f"  {p['model']}  {p['family']}/{p['kind']}  {p['strategy']}  "
          f"{len(names)} available: {', '.join(names) or 'NONE'}")
    if p.get("backup"):
        print(f"      backup tier: {', '.join(p['backup'])}")
    for name, reason in sorted((p.get("excluded") or {}).items()):
        print(f"      excluded {name}: {reason}")
in_pools = {name for p in pools for name in (p.get("excluded") or {})}
for name, reason in sorted((s.get("excluded") or {}).items()):
    if name not in in_pools:
        print(f"  excluded {name}: {reason}")
sys.exit(2 if failed else 0)
PY
)"

cmd_status() {
    local pid npid health up=0 down=0 rc=0 python=python3 json workers
    load_settings read
    if [ -x "$PYTHON" ]; then python="$PYTHON"; fi
    echo "ISH Gateway at $HOME_DIR ($([ -f "$GATEWAY_ENV" ] && echo "settings $GATEWAY_ENV" || echo "NOT DEPLOYED: no $GATEWAY_ENV"))"

    if pid="$(controller_pid)"; then
        if admin_healthy; then
            echo "controller  running   pid $pid, admin API $ADMIN_URL healthy"
            up=$((up + 1))
        else
            echo "controller  DEGRADED  pid $pid, admin API $ADMIN_URL/admin/health does not answer"
            down=$((down + 1))
        fi
    else
        echo "controller  STOPPED"
        down=$((down + 1))
    fi

    if npid="$(nginx_pid)"; then
        workers="$(nginx_workers "$npid" | wc -l)"
        if health="$(http_get "$HTTP_URL/health")"; then
            echo "nginx       running   master pid $npid, $workers workers, $HTTP_URL/health: $health"
            up=$((up + 1))
        else
            echo "nginx       DEGRADED  master pid $npid, $workers workers, $HTTP_URL/health does not answer"
            down=$((down + 1))
        fi
        if tls_enabled; then
            if http_get -k -o /dev/null "$HTTPS_URL/health"; then
                echo "            HTTPS     $HTTPS_URL/health ok (certificate $(openssl x509 -in "$TLS_CERT" -noout -enddate 2>/dev/null))"
            else
                echo "            HTTPS     $HTTPS_URL/health does not answer"
                down=$((down + 1))
            fi
        fi
    else
        echo "nginx       STOPPED"
        down=$((down + 1))
    fi

    if [ "$up" -gt 0 ] && pid="$(controller_pid)"; then
        if json="$(admin_get /admin/status)"; then
            "$python" -c "$STATUS_FORMAT" <<<"$json" || rc=$?
        else
            echo "config      unknown: GET $ADMIN_URL/admin/status failed (admin key: $KEY_FILE)"
        fi
    fi
    if [ "$up" -eq 0 ]; then return 3; fi
    if [ "$down" -gt 0 ]; then return 1; fi
    return "$rc"
}

cmd_logs() {
    local follow=0 lines=50 files=() file
    while [ "$#" -gt 0 ]; do
        case "$1" in
            -f | --follow) follow=1 ;;
            -n) lines="${2:?-n needs a number}"; shift ;;
            *) die "logs: unknown argument $1 (usage: logs [-f] [-n N])" ;;
        esac
        shift
    done
    load_settings read
    for file in "$CONTROLLER_LOG" "$NGINX_ERROR_LOG"; do
        [ -f "$file" ] && files+=("$file")
    done
    if [ "$follow" -eq 1 ]; then
        exec tail -n "$lines" -F "$CONTROLLER_LOG" "$NGINX_ERROR_LOG"
    fi
    [ "${#files[@]}" -gt 0 ] || die "no logs under $HOME_DIR yet"
    tail -n "$lines" "${files[@]}"
}

# --- update, backup, restore, clean ---------------------------------------------------------------------

# is_gateway_home: gateway.env as deploy writes it, and secrets/: what clean and restore insist on.
is_gateway_home() {
    [ "$HOME_DIR" != / ] && [ -d "$HOME_DIR/secrets" ] && [ -f "$GATEWAY_ENV" ] \
        && head -n 1 "$GATEWAY_ENV" | grep -q '^# ISH Gateway settings, written by'
}

require_gateway_home() {
    is_gateway_home || die "$HOME_DIR is not an ISH Gateway home (no gateway.env written by deploy, or no secrets/):" \
        "set ISHGW_HOME, or deploy first"
}

# controller_python ARGS: python with exactly the controller's environment (gateway.env, provider.env).
controller_python() {
    local env_lines
    mapfile -t env_lines < <(controller_env)
    (cd "$HOME_DIR" && exec 9>&- && exec env -i "${env_lines[@]}" "$PYTHON" "$@")
}

cmd_update() {
    local pid
    load_settings read
    require_gateway_home
    load_provider_env
    take_lock
    ensure_apt_packages "${RUNTIME_APT_PACKAGES[@]}"
    ISHGW_VENV="${CFG[ISHGW_VENV]}"
    ensure_venv clients test # reinstalls only when pyproject.toml is newer than the last install
    warn_unknown_settings
    # The old controller stops before the migration: it never meets a schema (or sealed keys) it does not know.
    if pid="$(controller_pid)"; then
        log "restarting the controller (pid $pid); nginx keeps serving and is reloaded only if its configuration changed"
        stop_controller
    fi
    log "migrating the registry"
    controller_python -m control_plane.backup migrate \
        || die "the registry migration failed: the controller is stopped, nginx keeps serving; fix the cause and run update again"
    start_controller
    wait_ready
    log "updated (gateway $("$PYTHON" -c 'from control_plane.backup import gateway_version; print(gateway_version())'))"
}

cmd_backup() {
    local file="" secrets=()
    while [ "$#" -gt 0 ]; do
        case "$1" in
            --with-secrets) secrets=(--with-secrets) ;;
            -*) die "backup: unknown option $1 (usage: backup [--with-secrets] [FILE])" ;;
            *) [ -z "$file" ] || die "backup takes one FILE"; file="$1" ;;
        esac
        shift
    done
    load_settings read
    require_gateway_home
    load_provider_env
    file="$(realpath -m "${file:-$HOME_DIR/backups/manual-$(date -u +%Y%m%dT%H%M%SZ).tar.gz}")"
    controller_python -m control_plane.backup create "$file" "${secrets[@]}" || die "backup failed"
}

cmd_restore() {
    local file
    [ "$#" -eq 1 ] || die "usage: restore FILE"
    load_settings read
    require_gateway_home
    load_provider_env
    file="$(realpath -e "$1" 2>/dev/null)" || die "restore: $1: no such file"
    # Verified before anything stops: a damaged, foreign or unusable archive changes nothing.
    controller_python -m control_plane.backup verify "$file" || die "nothing was changed"
    take_lock
    stop_controller # nginx keeps serving the running configuration
    if ! controller_python -m control_plane.backup restore "$file"; then
        start_controller
        die "restore failed: the controller was started again on what is in place"
    fi
    load_settings read # the restored gateway.env and provider.env
    load_provider_env
    start_controller
    wait_ready
    log "restored $file into $HOME_DIR"
}

cmd_clean() {
    local yes=0 answer
    while [ "$#" -gt 0 ]; do
        case "$1" in
            --yes | -y) yes=1 ;;
            *) die "clean: unknown argument $1 (usage: clean [--yes])" ;;
        esac
        shift
    done
    load_settings read
    is_gateway_home || die "$HOME_DIR is not an ISH Gateway home (no gateway.env written by deploy, or no secrets/):" \
        "refusing to remove anything"
    if [ "$yes" -eq 0 ]; then
        [ -t 0 ] || die "clean removes everything under $HOME_DIR: confirm on a terminal, or pass --yes"
        read -r -p "Remove everything under $HOME_DIR (registry, certificates, secrets, backups, logs)? Type yes: " answer
        [ "$answer" = yes ] || die "not confirmed: nothing was removed"
    fi
    take_lock
    stop_controller
    stop_nginx
    find "$HOME_DIR" -mindepth 1 -maxdepth 1 -exec rm -rf -- {} +
    log "removed everything under $HOME_DIR"
    if [[ "${CFG[ISHGW_DB_URL]}" != sqlite:* ]]; then log "the registry database ${CFG[ISHGW_DB_URL]%%://*}://... is not under $HOME_DIR: left as it is"; fi
    if [ -n "${CFG[ISHGW_REGISTRY_KEY_FILE]:-}" ]; then log "ISHGW_REGISTRY_KEY_FILE ${CFG[ISHGW_REGISTRY_KEY_FILE]} left as it is"; fi
}

main() {
    local command="${1:-help}"
    [ "$#" -eq 0 ] || shift
    case "$command" in
        deploy)
            SYSTEMD=0
            if [ "${1:-}" = --systemd ]; then SYSTEMD=1; shift; fi
            [ "$#" -eq 0 ] || die "deploy takes no arguments but --systemd (settings come from ISHGW_* variables)"
            cmd_deploy
            ;;
        stop) cmd_stop ;;
        restart)
            load_settings read
            SYSTEMD=0
            if unit_active; then SYSTEMD=1; fi
            cmd_stop
            cmd_deploy
            ;;
        status) cmd_status ;;
        logs) cmd_logs "$@" ;;
        update) [ "$#" -eq 0 ] || die "update takes no arguments"; cmd_update ;;
        backup) cmd_backup "$@" ;;
        restore) cmd_restore "$@" ;;
        clean) cmd_clean "$@" ;;
        help | -h | --help) usage ;;
        *) usage >&2; exit 64 ;;
    esac
}

main "$@"
