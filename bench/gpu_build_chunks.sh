#!/usr/bin/env bash
# What the whole DAG needs on the GPU machine beyond bench/gpu_build_wheels.sh's wheels: Open3D
# (open3d-cpu, 105 MB, and what `import open3d` imports: plotly, dash, flask, ...), pymeshlab
# (106 MB), xatlas, meshoptimizer (a ctypes library: the installed package is copied, it loads on
# any CPython), lpips, pyrender and its GL stack, and the shared libraries Open3D links that the
# machine's image may lack (libX11, libudev, libusb, libidn2; Debian bookworm's, unpacked under
# /tmp/sysroot). Together ~230 MB: over one call's 64 MiB. So they travel in parts, one part per
# call, on calls back to back while the machine stays warm (it goes back after 30 s idle): .gbc1
# ... .gbcN, each under 58 MiB, with gpu_build_wheels.sh's .whl and .bench-data in the same parts.
# Each call copies its part to /tmp/p: /tmp stays while the machine is warm, the checkout's
# ignored folders do not (a call's carry replaces them).
#
#   bash bench/gpu_build_chunks.sh          # after bench/gpu_build_wheels.sh; prints the calls
#
# Ran on the H200 on 2026-12-02 (bench/results/gpu_build_h200_whole_dag.md); see
# bench/GPU_BUILD_RUN.md, "The whole DAG".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EXCLUDE=$(git rev-parse --git-path info/exclude)
for d in /.gbw/ /.gbc1/ /.gbc2/ /.gbc3/ /.gbc4/ /.gbc5/ /.gl/; do
  grep -qx "$d" "$EXCLUDE" 2>/dev/null || echo "$d" >> "$EXCLUDE"
done
mkdir -p .gbw/debs .gl
version() { "$PY" -m pip show "$1" 2>/dev/null | awk '/^Version/{print $2}'; }
PLATFORMS=()
for p in manylinux_2_35_x86_64 manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux_2_5_x86_64 manylinux1_x86_64 any; do PLATFORMS+=(--platform "$p"); done
# open3d-cpu: the same `open3d` module as the project's open3d, without CUDA (the DAG's Open3D work
# runs on the CPU)
for spec in "open3d-cpu==$(version open3d)" pymeshlab xatlas lpips pyrender pyglet PyOpenGL freetype-py \
            plotly dash flask blinker itsdangerous retrying nest-asyncio janus comm; do
  name=${spec%%==*}
  v=${spec#*==}; [ "$v" = "$spec" ] && v=$(version "$name")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .gbw "$name${v:+==$v}"
done
site=$("$PY" -c "import meshoptimizer, os; print(os.path.dirname(os.path.dirname(meshoptimizer.__file__)))")
tar cf .gbw/meshoptimizer.tar -C "$site" meshoptimizer "meshoptimizer-$(version meshoptimizer).dist-info"
o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
mkdir -p /tmp/amd64/partial
apt-get $o update -qq
(cd .gl && apt-get $o download -qq libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
(cd .gbw/debs && apt-get $o download -qq libglu1-mesa libx11-6 libx11-data libxcb1 libxau6 libxdmcp6 \
  libbsd0 libmd0 libudev1 libusb-1.0-0 libidn2-0 libunistring2)
rm -rf .gbc*
tar cf - .gbw .whl .bench-data | split -b 58m -d -a 1 - /tmp/gbw.part.
n=0
for part in /tmp/gbw.part.*; do
  n=$((n + 1)); mkdir -p ".gbc$n"; mv "$part" ".gbc$n/"
done
echo "parts: $n (.gbc1 ... .gbc$n), $(du -shc .gbc* | tail -1 | cut -f1)"
echo "calls, back to back (carry one part each; the last also carries .gl):"
for k in $(seq 1 $((n - 1))); do echo "  carry [\".gbc$k\"]  command: mkdir -p /tmp/p && cp .gbc$k/* /tmp/p/"; done
# The bench's commands: the first call installs (once per warm machine: /tmp stays, the marker says
# so; bench/unpack_wheels.py unpacks the wheels in parallel, seconds where pip took 60-130 s of
# the call) and runs the fast path, both modes (the first warm-up takes the whole source, Prefect's one batch);
# the next call runs the standard path on 6 rows in batches of 2 (its mesh stage is 7 s an
# object). ROWS: the rows `gpu_build_wheels.sh` generated (default 24). The fast call also records
# which thread holds the GIL (--gil) and takes up to 4 native stack dumps while the GPU idles
# (--native-dumps), both with py-spy, beside its JSON. A diagnosis-only call can add
# `--set mesher.compile=false --set source.limit=12` to shorten the warm-up.
ENV='export PYTHONPATH=/tmp/site:$PWD LD_LIBRARY_PATH=/tmp/sysroot/usr/lib/x86_64-linux-gnu:/tmp/sysroot/lib/x86_64-linux-gnu PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PYOPENGL_PLATFORM=egl;'
ROWS=${ROWS:-24}
BENCH="python3 bench/gpu_build_bench.py --rows $ROWS --set mesher.post_processes=12 --data /tmp/.bench-data/source --work /tmp/gb --modes plain,prefect"
cat <<EOF
  carry [".gbc$n", ".gl"]  command (installs, then the fast path):
    [ -f /tmp/site/.installed ] || { cp .gbc$n/* /tmp/p/ && cat /tmp/p/gbw.part.* | tar xf - -C /tmp && for f in .gl/*.deb; do dpkg -x \$f /; done; ldconfig;
    mkdir -p /tmp/sysroot && for f in /tmp/.gbw/debs/*.deb; do dpkg -x \$f /tmp/sysroot; done;
    python3 bench/unpack_wheels.py --target /tmp/site /tmp/.whl/*.whl /tmp/.gbw/*.whl && tar xf /tmp/.gbw/meshoptimizer.tar -C /tmp/site && touch /tmp/site/.installed; } || exit;
    $ENV
    python3 -c "import open3d, pymeshlab, pyrender, xatlas, meshoptimizer, lpips; print('imports ok')" &&
    timeout 540 $BENCH --paths fast --batch-rows 4 --gil --native-dumps 4 --json \$OUT/gpu_build_h200_fast.json 2>&1 | tee \$OUT/gpu_build_h200_fast.log | tail -5
  then at once, no carry (the machine still warm, the same install), the standard path:
    [ -f /tmp/site/.installed ] || exit 3; $ENV
    timeout 560 $BENCH --paths standard --batch-rows 2 --set source.limit=6 --json \$OUT/gpu_build_h200_standard.json 2>&1 | tee \$OUT/gpu_build_h200_standard.log | tail -5
  then, with ~450 s of device time left, no carry: the fast path through Prefect with more batches in
  flight (its first warm-up takes the whole source; each variant runs in the same warm process):
    [ -f /tmp/site/.installed ] || exit 3; $ENV
    timeout 560 ${BENCH/--modes plain,prefect/--modes prefect} --paths fast --batch-rows 4 --variant bif8:runtime.batches_in_flight=8 --json \$OUT/gpu_build_h200_fast_in_flight.json 2>&1 | tee \$OUT/gpu_build_h200_fast_in_flight.log | tail -5
EOF
