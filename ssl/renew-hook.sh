#!/usr/bin/env bash
# certbot deploy hook: make the running gateway serve the certificate certbot just issued or renewed.
#
#   certbot renew --deploy-hook "/path/to/ssl/renew-hook.sh --home /var/lib/ish-gateway"
#
# The gateway reads $ISHGW_HOME/ssl/cert.pem and key.pem, which ssl/letsencrypt-setup.sh links to certbot's
# live/ files, so a renewal changes what those paths hold, not the paths. This hook asks the controller
# for a reload (POST /admin/reload): it renders the configuration (the certificate's fingerprint is part of
# its checksum), runs `nginx -t` and sends HUP, so nginx switches to the new files without dropping a
# connection and without restarting the controller. Then it checks that HTTPS serves the new serial.
#
# The gateway's home: --home DIR, else ISHGW_HOME, else /var/lib/ish-gateway. From its gateway.env (else
# the environment): ISHGW_ADMIN_LISTEN, ISHGW_ADMIN_API_KEY (else <home>/secrets/admin_api_key),
# ISHGW_HTTPS_PORT, ISHGW_LISTEN_ADDRESS, ISHGW_TLS_CERT. certbot sets RENEWED_LINEAGE and RENEWED_DOMAINS.
# Exits non-zero when the controller does not answer or refuses the new configuration (nginx then keeps
# serving the previous one).
set -euo pipefail
# shellcheck source=scripts/lib/functions.sh
source "$(dirname "$(readlink -f "$0")")/../scripts/lib/functions.sh"

HOME_DIR="${ISHGW_HOME:-/var/lib/ish-gateway}"
while [ "$#" -gt 0 ]; do
    case "$1" in
        --home) HOME_DIR="${2:?--home needs a directory}"; shift ;;
        -h | --help) sed -n '2,17s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (usage: renew-hook.sh [--home DIR])" ;;
    esac
    shift
done
GATEWAY_ENV="$HOME_DIR/gateway.env"

# gw_setting NAME DEFAULT: the value in gateway.env (it describes what runs), else the environment, else
# DEFAULT. gateway.env is read as data (NAME=value lines), never sourced.
gw_setting() {
    local value=""
    if [ -r "$GATEWAY_ENV" ]; then
        value="$(grep -m1 "^$1=" "$GATEWAY_ENV" 2>/dev/null | cut -d= -f2- || true)"
    fi
    [ -n "$value" ] || value="${!1:-}"
    printf '%s' "${value:-$2}"
}

admin_listen="$(gw_setting ISHGW_ADMIN_LISTEN 127.0.0.1:9000)"
admin_url="http://$(client_host "${admin_listen%:*}"):${admin_listen##*:}"
key="$(gw_setting ISHGW_ADMIN_API_KEY "")"
if [ -z "$key" ]; then
    key="$(tr -d '\n' <"$HOME_DIR/secrets/admin_api_key" 2>/dev/null)" \
        || die "no admin key: neither ISHGW_ADMIN_API_KEY nor $HOME_DIR/secrets/admin_api_key"
fi

log "certificate ${RENEWED_DOMAINS:+for $RENEWED_DOMAINS }renewed${RENEWED_LINEAGE:+ ($RENEWED_LINEAGE)}: reloading the gateway"
body="$(mktemp)"
trap 'rm -f "$body"' EXIT
code=""
for attempt in 1 2 3 4 5; do
    # The key goes through stdin, never through argv (visible in ps).
    code="$(printf 'X-Admin-API-Key: %s\n' "$key" \
        | curl -sS --noproxy '*' --max-time 60 -o "$body" -w '%{http_code}' -X POST -H @- \
            "$admin_url/admin/reload" 2>/dev/null)" || code="000"
    [ "$code" = 000 ] || break
    log "the controller at $admin_url does not answer (attempt $attempt of 5)"
    sleep 2
done
case "$code" in
    200) log "reload done: $(head -c 300 "$body")" ;;
    000) die "the controller at $admin_url did not answer: nginx serves the previous certificate until the controller runs again (it picks the new one up at its next reconcile)" ;;
    *) die "POST /admin/reload answered $code: $(head -c 600 "$body") (nginx keeps serving the previous configuration)" ;;
esac

# Check what HTTPS serves now against the certificate the gateway points at.
https_port="$(gw_setting ISHGW_HTTPS_PORT 8443)"
cert="$(gw_setting ISHGW_TLS_CERT "$HOME_DIR/ssl/cert.pem")"
if [ "$https_port" != 0 ] && [ -r "$cert" ]; then
    host="$(client_host "$(gw_setting ISHGW_LISTEN_ADDRESS 0.0.0.0)")"
    sni="${RENEWED_DOMAINS%% *}"
    want="$(openssl x509 -in "$cert" -noout -serial | cut -d= -f2)"
    served="$(timeout 10 openssl s_client -connect "$host:$https_port" ${sni:+-servername "$sni"} </dev/null 2>/dev/null \
        | openssl x509 -noout -serial 2>/dev/null | cut -d= -f2 || true)"
    if [ "$served" = "$want" ]; then
        log "HTTPS on port $https_port serves serial $served ($(openssl x509 -in "$cert" -noout -enddate))"
    else
        die "HTTPS on port $https_port serves serial ${served:-none}, expected $want from $cert"
    fi
fi
