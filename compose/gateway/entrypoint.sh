#!/bin/sh
# The gateway container's start: what scripts/deploy-load-balancer.sh deploy does before it starts the
# controller (the state directory, a self-signed certificate unless one is configured), then the controller,
# which renders the configuration and starts nginx as its child. On SIGTERM (docker stop) it does what
# `deploy-load-balancer.sh stop` does: the controller first, then a graceful QUIT to nginx, so requests in
# flight finish (within ISHGW_STOP_TIMEOUT, 30 s; compose's stop_grace_period is longer).
set -eu
HOME_DIR="${ISHGW_HOME:-/var/lib/ish-gateway}"
RUN_DIR="${ISHGW_RUN_DIR:-$HOME_DIR/run}"
PID_FILE="$HOME_DIR/nginx/nginx.pid"
STOP_TIMEOUT="${ISHGW_STOP_TIMEOUT:-30}"
mkdir -p "$HOME_DIR"
chmod 0711 "$HOME_DIR" # traversable by the nginx workers; what is secret below it is 0600/0700

# A fresh container runs no nginx: what the previous container's nginx left in the volume when it was killed
# (its pid file, its unix sockets: nginx could not bind them again) belongs to no process.
rm -f "$PID_FILE"
if [ -d "$RUN_DIR" ]; then find "$RUN_DIR" -maxdepth 1 -type s -delete; fi

if [ "${ISHGW_HTTPS_PORT:-8443}" != 0 ] && [ -z "${ISHGW_TLS_CERT:-}" ]; then
    # Keeps a valid certificate (the volume's) and makes one when there is none or it expires soon.
    /opt/ish-gateway/ssl/generate-certs.sh "$HOME_DIR/ssl"
fi

quit_nginx() {
    pid="$(cat "$PID_FILE" 2>/dev/null || true)"
    [ -n "$pid" ] && kill -QUIT "$pid" 2>/dev/null || return 0
    deadline=$(($(date +%s) + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.1; done
}

cd "$HOME_DIR"
umask 022 # the controller sets the modes of its secrets itself; the nginx workers must read the rest
/opt/ish-gateway/.venv/bin/python -m control_plane &
controller=$!
trap 'kill -TERM "$controller" 2>/dev/null || true' TERM INT
status=0
wait "$controller" || status=$?
if kill -0 "$controller" 2>/dev/null; then # woken by the signal: the controller is still stopping
    status=0
    wait "$controller" || status=$?
fi
quit_nginx
exit "$status"
