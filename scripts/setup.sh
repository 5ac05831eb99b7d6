#!/usr/bin/env bash
# Idempotent set-up: .venv with requirements.txt, then a Vulkan device for SAPIEN.
# Already set up -> returns in seconds. Called by `make setup`, `make train`, `make test`, .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
STAMP="$VENV/.requirements.sha256"

APT_DIR="${APT_DIR:-/etc/apt}"  # tests point it at a fake one

say() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

# The bookworm-backports source line, on the mirror this machine already uses for Debian 12 (the first source
# serving suite "bookworm", in one-line .list or deb822 .sources format): a machine behind a proxy or with an
# internal mirror may have no route to any other host.
backports_line() {
  local f uri=""
  for f in "$APT_DIR/sources.list" "$APT_DIR"/sources.list.d/*.list; do
    [[ -f "$f" && -z "$uri" ]] || continue
    uri=$(awk '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                             if ($(i + 1) == "bookworm") { print $i; exit } }' "$f")
  done
  for f in "$APT_DIR"/sources.list.d/*.sources; do
    [[ -f "$f" && -z "$uri" ]] || continue
    uri=$(awk 'BEGIN { RS = ""; FS = "\n" }
               { u = ""; ok = 0; on = 1
                 for (k = 1; k <= NF; k++) {
                   if ($k ~ /^URIs:/) { split(substr($k, 6), a, " "); u = a[1] }
                   if ($k ~ /^Suites:/ && (" " substr($k, 8) " ") ~ / bookworm /) ok = 1
                   if ($k ~ /^Enabled: *no/) on = 0 }
                 if (ok && on && u != "") { print u; exit } }' "$f")
  done
  [[ -n "$uri" ]] || die "no Debian bookworm source in $APT_DIR/sources.list or $APT_DIR/sources.list.d/; add your mirror's line, e.g. 'deb http://<your-debian-mirror>/debian bookworm-backports main', to $APT_DIR/sources.list.d/bookworm-backports.list and rerun"
  echo "deb $uri bookworm-backports main"
}
[[ "${1:-}" == "--backports-line" ]] && { backports_line; exit 0; }

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
  if ! grep -rqs "bookworm-backports" "$APT_DIR/sources.list" "$APT_DIR/sources.list.d/"; then
    line=$(backports_line)
    say "adding '$line' to $APT_DIR/sources.list.d/bookworm-backports.list"
    echo "$line" > "$APT_DIR/sources.list.d/bookworm-backports.list"
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null
  out=$(probe) || die "lavapipe installed but SAPIEN still finds no Vulkan device ($out)"
  say "$out"
  exit 0
fi
die "no Vulkan device: install a GPU driver with Vulkan, or Mesa >= 24.3 lavapipe (Debian 12: apt-get install -t bookworm-backports mesa-vulkan-drivers libvulkan1; Ubuntu: mesa-vulkan-drivers from a Mesa >= 24.3 PPA), then rerun make setup"
