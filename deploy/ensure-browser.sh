#!/usr/bin/env bash
# Make sure a headless Chromium is installed for the dashboard's browser tests
# (tests/mesh/test_dashboard_browser.py drives it with Playwright; no browser is downloaded at
# test time). Installs Debian's `chromium` package when no `chromium` is on the PATH.
# EXEGPT_TEST_CHROMIUM names another binary (then nothing is installed).
set -u

browser=${EXEGPT_TEST_CHROMIUM:-}
if [ -n "$browser" ]; then
  [ -x "$browser" ] && exit 0
  echo "ensure-browser: EXEGPT_TEST_CHROMIUM=$browser is not an executable" >&2
  exit 1
fi
command -v chromium >/dev/null && exit 0
echo "ensure-browser: installing chromium (Debian package)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq chromium >/dev/null
command -v chromium >/dev/null || { echo "ensure-browser: chromium is still missing" >&2; exit 1; }
