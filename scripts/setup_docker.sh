#!/usr/bin/env bash
# Makes sure a Docker engine runs and the local stand-in image `smartswitch-sim:latest` exists.
# No registry is needed: the base image is a debootstrapped Debian (cached), the sim is copied in.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${SMARTSWITCH_CACHE:-$HOME/.cache/smartswitch}"
BASE=smartswitch-sim-base:bookworm
IMAGE=smartswitch-sim:latest
MIRROR="${SMARTSWITCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
log() { echo "[setup_docker] $*"; }

apt_install() {
  command -v apt-get >/dev/null 2>&1 || { echo "[setup_docker] install $* with your package manager" >&2; exit 1; }
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null 2>&1; then
    log "installing docker.io"
    apt_install docker.io
  fi
  log "starting dockerd (log: /var/log/smartswitch-dockerd.log)"
  $SUDO sh -c 'nohup dockerd >/var/log/smartswitch-dockerd.log 2>&1 &'
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "[setup_docker] dockerd did not start: see /var/log/smartswitch-dockerd.log" >&2; exit 1; }
fi

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  mkdir -p "$CACHE"
  tarball="$CACHE/bookworm-python3-rootfs.tar"
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null 2>&1 || { log "installing debootstrap"; apt_install debootstrap; }
    root="$(mktemp -d)"
    log "debootstrapping a minimal Debian with python3 (about a minute)"
    $SUDO debootstrap --variant=minbase --include=python3 bookworm "$root" "$MIRROR" >/dev/null
    $SUDO tar -C "$root" -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
    $SUDO rm -rf "$root"
  fi
  log "importing $BASE"
  docker import "$tarball" "$BASE" >/dev/null
fi

log "building $IMAGE"
DOCKER_BUILDKIT=0 docker build -q -f containers/sim.Dockerfile -t "$IMAGE" . >/dev/null
log "ready: $(docker image inspect -f '{{.Id}}' "$IMAGE" | cut -c1-19)"
