#!/bin/sh
# The gateway container's start: what scripts/deploy-load-balancer.sh deploy does before it starts the
# controller (the state directory, a self-signed certificate unless one is configured), then the controller
# itself, which renders the configuration and starts nginx as its child.
set -eu
HOME_DIR="${ISHGW_HOME:-/var/lib/ish-gateway}"
mkdir -p "$HOME_DIR"
chmod 0711 "$HOME_DIR" # traversable by the nginx workers; what is secret below it is 0600/0700

# A fresh container runs no nginx: a pid file left in the volume by the previous container names a process
# of another pid namespace (or, worse, an unrelated one of this one).
rm -f "$HOME_DIR/nginx/nginx.pid"

if [ "${ISHGW_HTTPS_PORT:-8443}" != 0 ] && [ -z "${ISHGW_TLS_CERT:-}" ]; then
    # Keeps a valid certificate (the volume's) and makes one when there is none or it expires soon.
    /opt/ish-gateway/ssl/generate-certs.sh "$HOME_DIR/ssl"
fi

cd "$HOME_DIR"
umask 022 # the controller sets the modes of its secrets itself; the nginx workers must read the rest
exec /opt/ish-gateway/.venv/bin/python -m control_plane
