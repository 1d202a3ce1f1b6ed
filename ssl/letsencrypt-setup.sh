#!/usr/bin/env bash
# Give the running gateway a real certificate from Let's Encrypt (or another ACME CA) and keep it renewed.
#
#   ISHGW_DOMAIN=gw.example.org ISHGW_EMAIL=ops@example.org ssl/letsencrypt-setup.sh
#
# 1. checks that the gateway serves the ACME webroot on its HTTP port (the CA fetches
#    http://DOMAIN/.well-known/acme-challenge/...: port 80 must reach ISHGW_HTTP_PORT);
# 2. runs certbot (webroot mode) for every name in ISHGW_DOMAIN against ISHGW_ACME_SERVER, with its config,
#    work and logs directories under $ISHGW_HOME/letsencrypt (/etc/letsencrypt is left alone);
# 3. links $ISHGW_HOME/ssl/cert.pem, key.pem and chain.pem to certbot's live/ files (a self-signed pair is
#    kept in ssl/self-signed/) and runs ssl/renew-hook.sh, which makes the controller reload nginx: the
#    controller keeps running, and every renewal later changes what the links point to, nothing else;
# 4. installs the renewal job: /etc/cron.d/ish-gateway-renew and the systemd units
#    ish-gateway-renew.service + .timer (enabled when systemd runs), both running
#    `certbot renew --deploy-hook ssl/renew-hook.sh` with the same directories.
#
# Settings (environment, else $ISHGW_HOME/gateway.env): ISHGW_HOME (/var/lib/ish-gateway), ISHGW_DOMAIN
# (required; comma separated, the first name names the certificate), ISHGW_EMAIL (required), ISHGW_ACME_SERVER
# (Let's Encrypt production; staging: https://acme-staging-v02.api.letsencrypt.org/directory),
# ISHGW_CRON_DIR (/etc/cron.d), ISHGW_SYSTEMD_DIR (/etc/systemd/system). Idempotent: a valid certificate is
# kept (certbot renews it once it is due), the links and the jobs are rewritten unchanged.
set -euo pipefail
# shellcheck source=scripts/lib/functions.sh
source "$(dirname "$(readlink -f "$0")")/../scripts/lib/functions.sh"

LE_PRODUCTION="https://acme-v02.api.letsencrypt.org/directory"
JOB_NAME="ish-gateway-renew"
HOOK="$ISHGW_ROOT/ssl/renew-hook.sh"

usage() { sed -n '2,22s/^# \{0,1\}//p' "$0"; }
case "${1:-}" in
    "") ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 64 ;;
esac

HOME_DIR="$(realpath -m "${ISHGW_HOME:-/var/lib/ish-gateway}")"
GATEWAY_ENV="$HOME_DIR/gateway.env"

# env_file_value NAME: NAME's value in gateway.env (read as data, never sourced); empty when absent.
env_file_value() {
    [ -r "$GATEWAY_ENV" ] || return 0
    grep -m1 "^$1=" "$GATEWAY_ENV" 2>/dev/null | cut -d= -f2- || true
}
# gw_setting NAME DEFAULT: how the running gateway is set up: gateway.env first (it describes what runs).
gw_setting() {
    local value
    value="$(env_file_value "$1")"
    [ -n "$value" ] || value="${!1:-}"
    printf '%s' "${value:-$2}"
}
# request_setting NAME DEFAULT: what the operator asks for now: the environment first.
request_setting() {
    local value="${!1:-}"
    [ -n "$value" ] || value="$(env_file_value "$1")"
    printf '%s' "${value:-$2}"
}
# client_host ADDRESS: where a local client connects to reach a listener bound to ADDRESS.
client_host() {
    local host="${1#[}"
    host="${host%]}"
    case "$host" in "" | "0.0.0.0" | "*") echo "127.0.0.1" ;; "::") echo "[::1]" ;; *:*) echo "[$host]" ;; *) echo "$host" ;; esac
}

# --- settings, validated: they end up in certbot's arguments, a cron line and systemd units -------------
SAFE_PATH='^/[A-Za-z0-9._/+-]*$'
[[ "$HOME_DIR" =~ $SAFE_PATH ]] || die "ISHGW_HOME $HOME_DIR: only letters, digits and ._/+- please (it goes into cron and systemd lines)"
[[ "$ISHGW_ROOT" =~ $SAFE_PATH ]] || die "the repository path $ISHGW_ROOT has characters cron and systemd lines cannot carry"

IFS=', ' read -r -a requested <<<"$(request_setting ISHGW_DOMAIN "")"
domains=()
for name in "${requested[@]}"; do
    [ -n "$name" ] || continue
    name="${name,,}"
    if ! [[ "$name" =~ ^[a-z0-9]([a-z0-9-]{0,62})(\.[a-z0-9]([a-z0-9-]{0,62}))+$ ]] || [[ "$name" =~ ^[0-9.]+$ ]]; then
        die "ISHGW_DOMAIN: '$name' is not a DNS name the CA can validate over HTTP (no IP addresses, no wildcards)"
    fi
    [[ " ${domains[*]} " == *" $name "* ]] || domains+=("$name")
done
[ "${#domains[@]}" -gt 0 ] || die "set ISHGW_DOMAIN to the name(s) clients use for the gateway, e.g. ISHGW_DOMAIN=gw.example.org"
CERT_NAME="${domains[0]}"

EMAIL="$(request_setting ISHGW_EMAIL "")"
[[ "$EMAIL" =~ ^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$ ]] || die "set ISHGW_EMAIL to the address the CA may write to about this account"
ACME_SERVER="$(request_setting ISHGW_ACME_SERVER "$LE_PRODUCTION")"
[[ "$ACME_SERVER" =~ ^https://[A-Za-z0-9._:/%-]+$ ]] || die "ISHGW_ACME_SERVER must be an https:// ACME directory URL"

LE_DIR="$HOME_DIR/letsencrypt"
CERTBOT_DIRS=(--config-dir "$LE_DIR/config" --work-dir "$LE_DIR/work" --logs-dir "$LE_DIR/logs")
LIVE="$LE_DIR/config/live/$CERT_NAME"
WEBROOT="$(gw_setting ISHGW_ACME_WEBROOT "$HOME_DIR/acme")"
HTTP_PORT="$(gw_setting ISHGW_HTTP_PORT 8080)"
HTTP_URL="http://$(client_host "$(gw_setting ISHGW_LISTEN_ADDRESS 0.0.0.0)"):$HTTP_PORT"
SSL_DIR="$HOME_DIR/ssl"
# The renew command stores no secret: the hook finds the admin key under ISHGW_HOME.
HOOK_CMD="$HOOK --home $HOME_DIR"

# The gateway must read the paths this script links, or it would never serve the new certificate.
for pair in "ISHGW_TLS_CERT:$SSL_DIR/cert.pem:$LIVE/fullchain.pem" "ISHGW_TLS_KEY:$SSL_DIR/key.pem:$LIVE/privkey.pem"; do
    IFS=: read -r var default live_file <<<"$pair"
    configured="$(gw_setting "$var" "$default")"
    if [ "$configured" != "$default" ] && [ "$configured" != "$live_file" ]; then
        die "$var=$configured: the gateway would not serve the new certificate. Drop the setting ($var= scripts/deploy-load-balancer.sh deploy) so that it reads $default"
    fi
done

# --- 1. pre-flight: the challenge path reaches the webroot through the gateway ---------------------------
[ -d "$HOME_DIR" ] || die "$HOME_DIR does not exist: deploy the gateway first (scripts/deploy-load-balancer.sh deploy)"
command -v certbot >/dev/null || ensure_apt_packages certbot
CERTBOT="$(command -v certbot)"
mkdir -p "$WEBROOT/.well-known/acme-challenge"
token="ishgw-preflight-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
probe="$WEBROOT/.well-known/acme-challenge/$token"
printf '%s' "$token" >"$probe"
chmod 0644 "$probe"
served="$(curl -fsS --noproxy '*' --max-time 5 "$HTTP_URL/.well-known/acme-challenge/$token" 2>/dev/null || true)"
rm -f "$probe"
[ "$served" = "$token" ] || die "the gateway does not serve $WEBROOT at $HTTP_URL/.well-known/acme-challenge/ (deploy it first: scripts/deploy-load-balancer.sh deploy)"
if [ "$(gw_setting ISHGW_HTTPS_PORT 8443)" = 0 ]; then
    log "warning: ISHGW_HTTPS_PORT=0: the certificate will be in place, but the gateway serves no HTTPS"
fi
if [ "$HTTP_PORT" != 80 ] && [ "$ACME_SERVER" = "$LE_PRODUCTION" ]; then
    log "note: Let's Encrypt validates on port 80; the gateway's HTTP port is $HTTP_PORT, so port 80 must be forwarded to it"
fi

# --- 2. the certificate ----------------------------------------------------------------------------------
domain_args=()
for name in "${domains[@]}"; do domain_args+=(-d "$name"); done
log "requesting a certificate for ${domains[*]} from $ACME_SERVER (certbot files in $LE_DIR)"
(umask 022 && mkdir -p "$LE_DIR")
"$CERTBOT" certonly --non-interactive --agree-tos --email "$EMAIL" --no-eff-email \
    --webroot --webroot-path "$WEBROOT" --cert-name "$CERT_NAME" "${domain_args[@]}" \
    --server "$ACME_SERVER" --keep-until-expiring --expand \
    --deploy-hook "$HOOK_CMD" "${CERTBOT_DIRS[@]}" \
    || die "certbot could not get the certificate (log: $LE_DIR/logs/letsencrypt.log)"
if [ ! -s "$LIVE/fullchain.pem" ] || [ ! -s "$LIVE/privkey.pem" ]; then
    die "certbot left no certificate in $LIVE"
fi

# --- 3. point the gateway at it --------------------------------------------------------------------------
# link TARGET LINK: replace LINK by a symlink atomically (rename), so nginx never finds the path missing.
link() {
    local tmp="$2.tmp.$$"
    ln -sfn "$1" "$tmp"
    mv -Tf "$tmp" "$2"
}
mkdir -p "$SSL_DIR"
for file in cert.pem key.pem; do
    if [ -f "$SSL_DIR/$file" ] && [ ! -L "$SSL_DIR/$file" ]; then
        (umask 077 && mkdir -p "$SSL_DIR/self-signed")
        cp -p "$SSL_DIR/$file" "$SSL_DIR/self-signed/$file"
        log "kept the previous $file in $SSL_DIR/self-signed/"
    fi
done
link "$LIVE/privkey.pem" "$SSL_DIR/key.pem"
link "$LIVE/fullchain.pem" "$SSL_DIR/cert.pem"
link "$LIVE/chain.pem" "$SSL_DIR/chain.pem" # the issuer chain, for OCSP stapling
RENEWED_LINEAGE="$LIVE" RENEWED_DOMAINS="${domains[*]}" "$HOOK" --home "$HOME_DIR"

# --- 4. the renewal job ----------------------------------------------------------------------------------
RENEW_CMD="$CERTBOT renew --quiet --config-dir $LE_DIR/config --work-dir $LE_DIR/work --logs-dir $LE_DIR/logs --deploy-hook \"$HOOK_CMD\""
CRON_DIR="${ISHGW_CRON_DIR:-/etc/cron.d}"
SYSTEMD_DIR="${ISHGW_SYSTEMD_DIR:-/etc/systemd/system}"

# write_file PATH MODE: stdin into PATH atomically; says whether it changed.
write_file() {
    local tmp
    mkdir -p "$(dirname "$1")"
    tmp="$(mktemp "$1.XXXXXX")"
    cat >"$tmp"
    chmod "$2" "$tmp"
    if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv -f "$tmp" "$1" && log "wrote $1"; fi
}

minute=$(($(cksum <<<"$HOME_DIR" | cut -d' ' -f1) % 60))
write_file "$CRON_DIR/$JOB_NAME" 0644 <<EOF
# ISH Gateway: renew the certificate of $HOME_DIR twice a day (certbot renews within 30 days of expiry;
# ssl/renew-hook.sh then makes the controller reload nginx). Written by ssl/letsencrypt-setup.sh.
# Where systemd runs the ish-gateway-renew.timer, the timer does it and this line stays quiet.
SHELL=/bin/sh
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
$minute 3,15 * * * root test -d /run/systemd/system && systemctl is-enabled --quiet $JOB_NAME.timer 2>/dev/null || $RENEW_CMD
EOF

write_file "$SYSTEMD_DIR/$JOB_NAME.service" 0644 <<EOF
# Written by ssl/letsencrypt-setup.sh.
[Unit]
Description=Renew the ISH Gateway certificate ($HOME_DIR) and reload nginx
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
ExecStart=$RENEW_CMD
EOF

write_file "$SYSTEMD_DIR/$JOB_NAME.timer" 0644 <<EOF
# Written by ssl/letsencrypt-setup.sh.
[Unit]
Description=Renew the ISH Gateway certificate twice a day

[Timer]
OnCalendar=*-*-* 00,12:00:00
RandomizedDelaySec=1h
Persistent=true

[Install]
WantedBy=timers.target
EOF

scheduler=""
if [ "$SYSTEMD_DIR" = /etc/systemd/system ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    if systemctl daemon-reload && systemctl enable --now "$JOB_NAME.timer" >/dev/null 2>&1; then
        scheduler="systemd timer $JOB_NAME.timer"
    else
        log "warning: could not enable $JOB_NAME.timer; cron runs the renewal instead"
    fi
fi
if [ -z "$scheduler" ]; then
    if [ "$CRON_DIR" = /etc/cron.d ] && ! command -v cron >/dev/null; then
        ensure_apt_packages cron
        as_root service cron start >/dev/null 2>&1 || true
    fi
    scheduler="cron ($CRON_DIR/$JOB_NAME)"
fi

log "done: the gateway serves $(openssl x509 -in "$SSL_DIR/cert.pem" -noout -nameopt RFC2253 -subject -issuer -enddate | tr '\n' ' ')"
log "renewal: $scheduler runs: $RENEW_CMD"
