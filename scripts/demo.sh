#!/usr/bin/env bash
# Installs (idempotently) and runs the main job on the embedded default: the synthetic source with
# `truth` backends, end to end through Prefect to Parquet shards and a dataset card.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYOPENGL_PLATFORM=egl PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/refany3d build --source synthetic --until "${UNTIL:-shard}" --out "${OUT:-out/demo}" "$@"
