#!/usr/bin/env bash
# Idempotent set-up: .venv with requirements.txt, then a Vulkan device for SAPIEN.
# Already set up -> returns in seconds. Called by `make setup`, `make train`, `make test`, .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
STAMP="$VENV/.requirements.sha256"

say() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

# 1. Python environment -------------------------------------------------------------------------
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "Python >= 3.10 is needed ($("$PYTHON" --version 2>&1) found); set PYTHON=/path/to/python3.11"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  say "python env $VENV is up to date"
else
  say "creating $VENV and installing requirements.txt (about a minute with a local torch wheel)"
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV" \
    || die "could not create a venv; on Debian/Ubuntu: apt-get install python3-venv"
  "$VENV/bin/python" -m pip install -q --upgrade pip wheel
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  echo "$want" > "$STAMP"
fi

# 2. Vulkan device for SAPIEN --------------------------------------------------------------------
# ManiSkill builds render materials even for state observations, so no Vulkan device = no env.
probe() { timeout 120 "$VENV/bin/python" scripts/check_vulkan.py 2>/dev/null; }
if out=$(probe); then
  say "$out (system left untouched)"
  exit 0
fi
say "no Vulkan device found ($out)"

# Mesa's CPU rasteriser lavapipe works, but SAPIEN needs VK_KHR_external_semaphore_fd: Mesa >= 24.3.
# Debian 12 ships 22.3; bookworm-backports has 25.x.
. /etc/os-release 2>/dev/null || true
if [[ "$(id -u)" == 0 && "${ID:-}" == debian && "${VERSION_ID:-}" == 12 ]]; then
  say "installing Mesa lavapipe (mesa-vulkan-drivers) from bookworm-backports"
  list=/etc/apt/sources.list.d/bookworm-backports.list
  grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/ \
    || echo "deb http://deb.debian.org/debian bookworm-backports main" > "$list"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null
  out=$(probe) || die "lavapipe installed but SAPIEN still finds no Vulkan device ($out)"
  say "$out"
  exit 0
fi
die "no Vulkan device: install a GPU driver with Vulkan, or Mesa >= 24.3 lavapipe (Debian 12: apt-get install -t bookworm-backports mesa-vulkan-drivers libvulkan1; Ubuntu: mesa-vulkan-drivers from a Mesa >= 24.3 PPA), then rerun make setup"
