#!/usr/bin/env bash
# The Debian/Ubuntu libraries refany3d needs at run time, for every place that installs it:
# scripts/setup.sh (a checkout's .venv) and docker/Dockerfile.cpu / Dockerfile.gpu (worker images).
# Installs only what is missing (idempotent); extra package names on the command line are added,
# e.g. `install_system_deps.sh chromium` (setup.sh: the browser of the UI tests).
set -euo pipefail

RUNTIME_PACKAGES=(
  libusb-1.0-0  # open3d
  libgomp1      # torch, open3d
  # pyrender renders headless through EGL: libglvnd's EGL/GL dispatch, GLU (pyrender imports it),
  # and Mesa's EGL with llvmpipe (CPU machines; on NVIDIA machines the container toolkit or the
  # driver adds NVIDIA's EGL, which libglvnd prefers).
  libegl1 libgl1 libglu1-mesa libegl-mesa0 libgl1-mesa-dri
)

missing=()
for p in "${RUNTIME_PACKAGES[@]}" "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] apt: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
