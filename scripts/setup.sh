#!/usr/bin/env bash
# Set up this clone on Debian 12: the system packages of scripts/apt-packages.txt, then
# .venv with the locked dependencies and Blixard itself (editable).
# Idempotent: apt runs only when a package is missing; .venv is reused, and pip runs again
# only when requirements.lock (or pyproject.toml, for the editable install) changed.
# Works from any directory. apt-get needs root: without it, missing packages are an error.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf 'setup: %s\n' "$*" >&2; }

# One setup at a time per clone (quickstart and tests may start together).
exec 9<"$ROOT/scripts/setup.sh"
flock -w 1800 9 || { log "another setup.sh held the lock for 30 minutes"; exit 1; }

# --- 1. Debian packages -----------------------------------------------------------------
mapfile -t packages < <(awk '{ sub(/#.*/, ""); for (i = 1; i <= NF; i++) print $i }' \
  scripts/apt-packages.txt)
((${#packages[@]})) || { log "no package names read from scripts/apt-packages.txt"; exit 1; }

is_installed() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

missing=()
if command -v dpkg-query >/dev/null; then
  for pkg in "${packages[@]}"; do
    is_installed "$pkg" || missing+=("$pkg")
  done
else
  log "dpkg-query not found: this script expects Debian 12"
  exit 1
fi

if ((${#missing[@]})); then
  if [[ "$(id -u)" != 0 ]]; then
    log "missing Debian packages: ${missing[*]}"
    log "apt-get needs root; install them with:"
    log "  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
    log "or run this script as root."
    exit 1
  fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update
  apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${missing[@]}" </dev/null
  for pkg in "${missing[@]}"; do
    is_installed "$pkg" || { log "apt-get did not install $pkg"; exit 1; }
  done
else
  log "Debian packages: all ${#packages[@]} installed"
fi

# --- 2. Python virtualenv ---------------------------------------------------------------
VENV="$ROOT/.venv"
STAMP="$VENV/.blixard-setup-stamp"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  [[ -e "$VENV" ]] && { log "$VENV is broken: recreating it"; rm -rf "$VENV"; }
  log "creating $VENV with $(command -v python3) ($(python3 --version 2>&1))"
  python3 -m venv "$VENV"
fi

lock_line="lock=$(sha256sum requirements.lock | cut -d' ' -f1)"
project_line="project=$(sha256sum pyproject.toml | cut -d' ' -f1)"
stamp_has() { [[ -f "$STAMP" ]] && grep -qxF "$1" "$STAMP"; }

if stamp_has "$lock_line"; then
  log "locked dependencies: unchanged since the last setup"
  lock_installed=0
else
  log "installing requirements.lock into $VENV"
  "${PIP[@]}" install -q --progress-bar off --require-hashes -r requirements.lock
  lock_installed=1
fi

expected_init="$ROOT/src/blixard/__init__.py"
actual_init="$("$VENV/bin/python" -c 'import blixard; print(blixard.__file__)' 2>/dev/null || true)"
if ((lock_installed)) || ! stamp_has "$project_line" || [[ "$actual_init" != "$expected_init" ]]; then
  log "installing blixard (editable) from $ROOT"
  "${PIP[@]}" install -q --progress-bar off --no-deps -e "$ROOT"
fi

printf '%s\n%s\n' "$lock_line" "$project_line" >"$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
log "ready: $VENV ($("$VENV/bin/python" --version 2>&1))"
