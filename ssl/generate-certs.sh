#!/usr/bin/env bash
# Create a self-signed TLS certificate for the gateway's HTTPS listener.
#
#   ssl/generate-certs.sh [--force] [DIR]
#
# DIR defaults to $ISHGW_HOME/ssl (ISHGW_HOME defaults to /var/lib/ish-gateway). Writes DIR/cert.pem (0644)
# and DIR/key.pem (0600): EC P-256, valid 825 days, subjectAltName localhost, 127.0.0.1 and every name in
# ISHGW_DOMAIN (comma separated host names or IP addresses).
#
# Idempotent: an existing certificate is kept while it is valid (parses, matches its key, does not expire
# within ISHGW_CERT_RENEW_DAYS=14 days and, when self-signed, covers the names above). A certificate that
# another CA issued is never replaced without --force. After a replacement, running nginx picks the new
# certificate up on its next reload (POST /admin/reload).
set -euo pipefail
# shellcheck source=scripts/lib/functions.sh
source "$(dirname "$0")/../scripts/lib/functions.sh"

DAYS=825
RENEW_DAYS="${ISHGW_CERT_RENEW_DAYS:-14}"

usage() { sed -n '2,13s/^# \{0,1\}//p' "$0"; }

force=0
dir=""
while [ "$#" -gt 0 ]; do
    case "$1" in
        --force) force=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$dir" ] || die "only one DIR may be given"; dir="$1" ;;
    esac
    shift
done
dir="${dir:-${ISHGW_HOME:-/var/lib/ish-gateway}/ssl}"
cert="$dir/cert.pem"
key="$dir/key.pem"
[[ "$RENEW_DAYS" =~ ^[0-9]+$ ]] || die "ISHGW_CERT_RENEW_DAYS must be a number of days"

# The subjectAltName entries, validated: a name must not smuggle anything into openssl's -addext.
san_entries=("DNS:localhost" "IP Address:127.0.0.1")
IFS=', ' read -r -a domains <<<"${ISHGW_DOMAIN:-}"
for name in "${domains[@]}"; do
    [ -n "$name" ] || continue
    if [[ "$name" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || [[ "$name" =~ ^[0-9A-Fa-f:]+:[0-9A-Fa-f:.]*$ ]]; then
        entry="IP Address:$name"
    elif [[ "$name" =~ ^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$ ]]; then
        entry="DNS:${name,,}"
    else
        die "ISHGW_DOMAIN: '$name' is neither a host name nor an IP address"
    fi
    [[ " ${san_entries[*]} " == *" $entry "* ]] || san_entries+=("$entry")
done
common_name="${domains[0]:-localhost}"

# cert_problem: why the existing certificate must be replaced; empty output when it is fine to keep.
cert_problem() {
    if [ ! -s "$cert" ] || [ ! -s "$key" ]; then echo "missing"; return; fi
    openssl x509 -in "$cert" -noout 2>/dev/null || { echo "unreadable certificate"; return; }
    if [ "$(openssl x509 -in "$cert" -noout -pubkey 2>/dev/null)" != "$(openssl pkey -in "$key" -pubout 2>/dev/null)" ]; then
        echo "key does not match the certificate"; return
    fi
    openssl x509 -in "$cert" -noout -checkend $((RENEW_DAYS * 86400)) >/dev/null \
        || { echo "expires within $RENEW_DAYS days"; return; }
    if self_signed; then
        local have entry
        have="$(openssl x509 -in "$cert" -noout -ext subjectAltName 2>/dev/null | tail -n +2 | tr -d ' ')"
        for entry in "${san_entries[@]}"; do
            [[ ",$have," == *",${entry// /},"* ]] || { echo "does not cover $entry"; return; }
        done
    fi
}

self_signed() {
    [ "$(openssl x509 -in "$cert" -noout -issuer | cut -d= -f2-)" = "$(openssl x509 -in "$cert" -noout -subject | cut -d= -f2-)" ]
}

describe() {
    log "$1: $cert (key $key)"
    log "  $(openssl x509 -in "$cert" -noout -ext subjectAltName 2>/dev/null | tail -n +2 | sed 's/^ *//')"
    log "  $(openssl x509 -in "$cert" -noout -enddate), $(openssl x509 -in "$cert" -noout -fingerprint -sha256)"
}

mkdir -p "$dir"
problem="$(cert_problem)"
if [ "$force" -eq 0 ] && [ -z "$problem" ]; then
    describe "keeping the valid certificate"
    exit 0
fi
case "$problem" in missing | "unreadable certificate") replaceable=1 ;; *) replaceable=0 ;; esac
if [ "$force" -eq 0 ] && [ "$replaceable" -eq 0 ] && ! self_signed; then
    die "$cert is not self-signed and $problem; replace it yourself, or run with --force"
fi
[ "$force" -eq 1 ] || [ "$problem" = "missing" ] || log "replacing $cert: $problem"

tmp_key="$(mktemp "$dir/.key.XXXXXX")"
tmp_cert="$(mktemp "$dir/.cert.XXXXXX")"
trap 'rm -f "$tmp_key" "$tmp_cert"' EXIT

san="$(IFS=,; echo "${san_entries[*]}")"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days "$DAYS" \
    -subj "/O=ISH Gateway/CN=$common_name" \
    -addext "subjectAltName=${san//IP Address:/IP:}" \
    -addext "basicConstraints=critical,CA:FALSE" \
    -addext "keyUsage=critical,digitalSignature" \
    -addext "extendedKeyUsage=serverAuth" \
    -keyout "$tmp_key" -out "$tmp_cert" 2>/dev/null || die "openssl could not create the certificate"
chmod 0600 "$tmp_key"
chmod 0644 "$tmp_cert"
# Key first: a reader never sees a new certificate with an old key for longer than one rename.
mv -f "$tmp_key" "$key"
mv -f "$tmp_cert" "$cert"
describe "generated a self-signed certificate"
