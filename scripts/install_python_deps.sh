#!/usr/bin/env bash
# The one place that pip-installs refany3d and its Python packages, for every place that installs
# it: scripts/setup.sh (a checkout's .venv) and docker/Dockerfile.cpu / Dockerfile.gpu (worker
# images). Packages pyproject.toml cannot declare (installed without their declared dependencies)
# live here, so a docker worker has exactly what a checkout has.
#
# Usage: install_python_deps.sh PYTHON [PACKAGE ...]
#   PYTHON   interpreter of the environment to install into (.venv/bin/python, /opt/venv/bin/python)
#   PACKAGE  pip arguments for refany3d itself (default "."), e.g. -e ".[dev]" or ". s3fs gcsfs";
#            pip options (an extra index for CPU-only torch wheels) come through PIP_* variables.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${1:?usage: scripts/install_python_deps.sh PYTHON [PACKAGE ...]}
shift
(($#)) || set -- .

pip_install() { "$PY" -m pip install -q "$@"; }

pip_install --upgrade pip setuptools wheel
pip_install "$@"

# --- packages pyproject.toml cannot declare -----------------------------------------------------
# pyrender pins PyOpenGL==3.1.0, whose EGL path fails; its other needs are in pyproject.
pip_install --no-deps "pyrender==0.1.45"
# groundingdino-py's declared needs pull opencv-python and supervision, which it does not use
# for inference; install it and what it imports, nothing else.
pip_install addict yapf matplotlib pycocotools
pip_install --no-deps "groundingdino-py==0.4.0"
# hy3dgen declares gradio, rembg, onnxruntime, xatlas, ... for its apps; the shape pipeline needs
# only what pyproject lists (torch, diffusers, transformers, einops, pymeshlab, scikit-image, ...).
pip_install --no-deps "hy3dgen==2.0.2"
