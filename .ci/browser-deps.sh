#!/usr/bin/env bash
# Install Debian's chromium for tests/test_browser.py when it is missing (idempotent).
# Nothing else may download a browser: playwright drives this one via executable_path.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "browser-deps: /usr/bin/chromium present ($(/usr/bin/chromium --version 2>/dev/null | head -n1))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "browser-deps: /usr/bin/chromium is missing and this user cannot install packages (not root, no sudo)" >&2
        exit 1
    fi
fi

$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

if [ ! -x /usr/bin/chromium ]; then
    echo "browser-deps: installing chromium did not provide /usr/bin/chromium" >&2
    exit 1
fi
echo "browser-deps: installed $(/usr/bin/chromium --version 2>/dev/null | head -n1)"
