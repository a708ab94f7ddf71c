#!/usr/bin/env bash
# What bench/gpu_build_bench.py needs on the GPU machine that its image lacks, for Python 3.12:
#   .whl/               every missing wheel, one version each, --no-deps (so each dependency is named)
#   .bench-data/source  the synthetic source, generated here (its generator renders with pyrender,
#                       which the GPU machine lacks; the bench reuses it there: same rows, seed, code)
# Run from the repository root with the project's venv; prints the total size that travels.
#   bash bench/gpu_build_wheels.sh [ROWS]            (ROWS: synthetic source rows, default 6)
# Not carried, over the 64 MiB limit: open3d / open3d-cpu (99.6 MB wheel) and pymeshlab (98.7 MB);
# the bench then runs the DAG up to depth and times the mesh networks alone (see its docstring).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROWS=${1:-6}
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
for d in /.whl/ /.bench-data/; do grep -qx "$d" "$EXCLUDE" 2>/dev/null || echo "$d" >> "$EXCLUDE"; done
mkdir -p .whl .bench-data

# The bench's own needs: Prefect (the flow, and its server), hy3dgen (no deps: the shape pipeline
# needs torch, transformers, einops, scikit-image, opencv, PyYAML, tqdm - all on the machine - and
# diffusers + trimesh), segment-anything. Then Prefect's and diffusers' needs that the image lacks
# (closure of their metadata here, minus KINDS.md's package list).
# py-spy: the bench's --gil (which thread holds the GIL in each timed case).
WHEELS=(
  prefect==3.9.1 hy3dgen==2.0.2 diffusers==0.42.1 trimesh==5.2.0 segment-anything==1.0
  aiosqlite==0.22.1 alembic==1.20.1 amplitude-analytics==1.3.0 annotated-types==0.8.0 apprise==2.0.1
  asgi-lifespan==2.1.0 asyncpg==0.32.0 beartype==0.23.1 burner-redis==0.1.7 cachetools==7.3.3
  cffi==2.1.1 coolname==5.0.0 cronsim==2.8 cryptography==50.0.2 cyclopts==5.5.2 dateparser==1.5.0
  docker==7.2.0 docstring-parser==0.18.0 exceptiongroup==1.3.2 fastapi==0.150.0 graphviz==0.21
  greenlet==3.5.6 griffe==2.4.1 griffecli==2.4.1 griffelib==2.4.1 importlib-metadata==10.2.0
  jinja2-humanize-extension==0.4.0 jsonpatch==1.48 jsonpointer==3.12 jsonschema==4.26.0
  jsonschema-specifications==2025.9.1 lazy-importer==0.1.0 mako==1.4.3 oauthlib==4.0.1
  opentelemetry-api==1.45.2 orjson==3.13.0 pendulum==3.3.0 py-key-value-aio==0.5.0 pycparser==3.12
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-extra-types==2.11.1 pydantic-settings==2.16.3
  pydocket==0.27.2 python-dotenv==1.2.4 python-json-logger==4.2.0 python-slugify==9.1.3 pytz==2026.6
  readchar==4.2.2 redis==8.1.0 referencing==0.37.0 requests-oauthlib==2.0.0 rfc3339-validator==0.1.4
  rich-rst==2.2.0 rpds-py==2026.9.1 ruamel-yaml==0.19.1 semver==3.1.2 sniffio==1.3.1 sqlalchemy==2.1.9
  starlette==1.10.0 text-unidecode==1.3 toml==0.10.2 typing-inspection==0.4.5 tzdata==2026.6
  tzlocal==5.4.5 uncalled-for==0.6.2 uvicorn==0.54.0 websockets==16.1.1 whenever==0.11.0
  py-spy==0.4.3
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
         manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_24_x86_64 manylinux_2_5_x86_64; do
  PLATFORMS+=(--platform "$p")
done
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}
  if ls .whl/ | grep -qi "^$(echo "$name" | tr '-' '_')-${spec##*==}-"; then continue; fi
  # one version each: another version of the same package stops the whole install there
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$spec"
done

# The synthetic source at 512 px (the bench's --data), generated with this checkout's code.
PYTHONPATH=$PWD PYOPENGL_PLATFORM=egl "$PY" -c "
from refany3d.synthetic import ensure_synthetic
print(ensure_synthetic('.bench-data/source', $ROWS, 0))"

echo "wheels: $(ls .whl | wc -l) files, $(du -sh .whl | cut -f1)"
echo "source: $(du -sh .bench-data | cut -f1)"
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
extra=$(du -cb .whl .bench-data | tail -1 | cut -f1)
echo "travels: $(( (tracked + extra) / 1048576 )) MiB of 64 (tracked files + .whl + .bench-data; untracked files add to it)"
