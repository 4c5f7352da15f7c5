#!/usr/bin/env bash
# Install what the browser test (tests/test_browser_demo.py) needs: Debian's Chromium and ChromeDriver
# (/usr/bin/chromium, /usr/bin/chromedriver) and, when $PY names an interpreter, selenium into it.
# Idempotent: installs nothing that is already there. Never downloads a browser of its own.
# Exits 0 when everything is in place; otherwise prints why not and exits 1 (callers such as
# .ci/run ignore that: the browser test then skips, giving the reason).
set -uo pipefail

status=0

have_browser() { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }

if have_browser; then
    echo "install_browser: chromium and chromedriver already installed"
elif [ "$(id -u)" != "0" ]; then
    echo "install_browser: chromium/chromium-driver missing and not running as root:" \
         "cannot apt-get install them (run: sudo apt-get install chromium chromium-driver)"
    status=1
elif ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: chromium/chromium-driver missing and apt-get is not available on this system"
    status=1
else
    echo "install_browser: installing Debian's chromium and chromium-driver with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } \
            >/tmp/install_browser.apt.log 2>&1; then
        echo "install_browser: apt-get install chromium chromium-driver failed; last lines of its log:"
        tail -n 5 /tmp/install_browser.apt.log
        status=1
    elif ! have_browser; then
        echo "install_browser: apt-get finished but /usr/bin/chromium or /usr/bin/chromedriver is missing"
        status=1
    fi
fi

if [ -n "${PY:-}" ]; then
    if "$PY" -c "import selenium" 2>/dev/null; then
        echo "install_browser: selenium already installed"
    elif ! "$PY" -m pip install -q "selenium>=4.10"; then
        echo "install_browser: pip install selenium failed"
        status=1
    fi
fi

exit $status
