#!/usr/bin/env bash
# The browser for tests/test_dashboard.py: chromium and chromedriver, driven through selenium. Nothing else needs it.
#   bash scripts/install-browser.sh          exits 0 when both are there; else installs Debian's chromium and
#                                            chromium-driver with apt-get (as root, or through sudo) and checks
#                                            again; fails with one line where it cannot.
#   bash scripts/install-browser.sh --check  only looks: exit 0 when both are there, 1 when not, prints nothing.
# Both are looked up on PATH (chromium or chromium-browser, and chromedriver) unless PERSONA_AXIS_CHROMIUM and
# PERSONA_AXIS_CHROMEDRIVER name the executables (a macOS Chromium.app, say); the dashboard test looks the same way.
set -euo pipefail

have_browser() {
  if [ -n "${PERSONA_AXIS_CHROMIUM:-}" ]; then
    [ -x "$PERSONA_AXIS_CHROMIUM" ] || return 1
  else
    command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || return 1
  fi
  if [ -n "${PERSONA_AXIS_CHROMEDRIVER:-}" ]; then
    [ -x "$PERSONA_AXIS_CHROMEDRIVER" ] || return 1
  else
    command -v chromedriver >/dev/null 2>&1 || return 1
  fi
}

case "${1:-}" in
  --check) have_browser && exit 0 || exit 1 ;;
  "") ;;
  *) echo "usage: bash scripts/install-browser.sh [--check]" >&2; exit 2 ;;
esac

have_browser && exit 0

cannot() {
  echo "install-browser.sh: chromium + chromedriver not found and $1; install them yourself (Debian: apt-get install" \
    "chromium chromium-driver; elsewhere Chromium and a chromedriver of the same major version), then put them on" \
    "PATH or set PERSONA_AXIS_CHROMIUM and PERSONA_AXIS_CHROMEDRIVER" >&2
  exit 1
}

command -v apt-get >/dev/null 2>&1 || cannot "there is no apt-get here"
if [ "$(id -u)" = 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO="sudo -n"
else
  cannot "apt-get needs root (or sudo without a password)"
fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
have_browser || cannot "apt-get's chromium + chromium-driver did not provide them"
