#!/usr/bin/env bash
# Chromium for the browser test of `larvseg serve` (tests/test_serve.py drives it with Playwright through
# its executable_path; Playwright's own browser download is not used). Installs the distribution's
# `chromium` package quietly when no Chromium is found and this is root with apt-get (CI); otherwise it
# says how, and the browser test is skipped with that reason.
set -euo pipefail
for browser in chromium chromium-browser google-chrome; do
  if command -v "$browser" >/dev/null; then exit 0; fi
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  echo "installed $(command -v chromium)"
else
  echo "no Chromium found: install it (e.g. sudo apt-get install chromium) to run the browser test of larvseg serve; it is skipped otherwise" >&2
fi
