#!/usr/bin/env bash
# Installs (idempotently) and runs the whole test suite: lint, format check, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYOPENGL_PLATFORM=egl PREFECT_SERVER_ANALYTICS_ENABLED=false
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
set +e
.venv/bin/pytest "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$code"
