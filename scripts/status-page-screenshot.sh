#!/usr/bin/env bash
# Regenerate the README's picture of the status page (docs/status-page.png): a real gateway on free loopback
# ports with three stand-in instances and a trickle of traffic, one instance killed, the page taken in
# headless Chromium (tests/browser/status_scenario.py; the same scenario its test runs). Five minutes of
# traffic first (ISHGW_SCREENSHOT_WARMUP_S), so that the latency sparklines have a history to draw.
# Usage: scripts/status-page-screenshot.sh [OUT.png]
set -euo pipefail
# shellcheck source=scripts/lib/functions.sh
source "$(dirname "$0")/lib/functions.sh"
cd "$ISHGW_ROOT"

out="${1:-docs/status-page.png}"
ensure_apt_packages "${RUNTIME_APT_PACKAGES[@]}" chromium
ensure_venv test
mkdir -p "$(dirname "$out")"
log "status page screenshot -> $out"
"$ISHGW_VENV/bin/python" -m tests.browser.status_scenario --out "$out" \
    --warmup-s "${ISHGW_SCREENSHOT_WARMUP_S:-300}"
