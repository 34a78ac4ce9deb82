#!/usr/bin/env bash
# Install Debian's Chromium and its WebDriver (/usr/bin/chromium, /usr/bin/chromedriver) for the
# browser test of the text-generation server's web page (tests/serving/test_web_page.py).
# Idempotent: does nothing when both are already there. Needs root (CI runs as root) or sudo.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "chromium and chromedriver already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "error: installing chromium needs root (apt-get); run: sudo $0" >&2; exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
test -x /usr/bin/chromium && test -x /usr/bin/chromedriver
echo "installed: $(/usr/bin/chromium --version 2>/dev/null | head -1)"
