#!/usr/bin/env bash
# Installs the system packages the test tiers need when they are missing (Debian; needs root or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if ((${#need_apt[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "Missing system packages: ${need_apt[*]}. Install them with your package manager." >&2
    exit 1
  fi
  echo "Installing ${need_apt[*]} (apt-get)..."
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null || {
    echo "Could not install ${need_apt[*]}: run 'sudo apt-get install ${need_apt[*]}' and retry." >&2
    exit 1
  }
fi
