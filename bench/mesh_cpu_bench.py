"""The mesh stage's CPU part per asset at several face counts: reduction, UV atlas, projection texture.

Input: synthetic 512 px views and their `truth` raw surfaces (marching cubes of the object's signed
distance at `--grid`, a few hundred thousand faces, like a Hunyuan3D output). For each target face
count: hy3dgen clean-up, the meshoptimizer pre-pass (`mesher.coarse_factor`), FaceReducer and repair;
normalisation, the UV atlas (`mesher.uv_unwrapper`,
`uv_atlas_size`, `uv_partitions`), front-camera fit + projection; seconds per step, and the PSNR of the asset
re-rendered (ray cast, atlas sampled) at the fitted front camera vs the photo inside the mask.

    PYTHONPATH=. .venv/bin/python bench/mesh_cpu_bench.py --out bench/results/mesh_cpu.json   # fixtures: refany3d.testing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import trimesh

from refany3d.config import MesherSettings, TexturerSettings
from refany3d.models.mesher.truth import TruthMesher
from refany3d.models.texturer.projection import ProjectionTexturer
from refany3d.render.mesh import clean_and_reduce, compute_uv_atlas, normalize_mesh
from refany3d.render.texture import raycast_colours
from refany3d.stages._views import read_view
from refany3d.synthetic import read_truth
from refany3d.testing.views import synthetic_views


def _psnr(asset, photo, mask, pose, k) -> tuple[float, float]:
    rgb, seen = raycast_colours(asset, pose, k, photo.shape[1], photo.shape[0])
    both = mask & seen
    mse = ((rgb[both] - photo[both].astype(np.float64)) ** 2).mean()
    return float(10 * np.log10(255.0**2 / mse)), float(both.sum() / mask.sum())


def _one(raw, photo, mask, faces: int, mesher: MesherSettings, texturer: TexturerSettings) -> dict:
    times = {}
    start = time.perf_counter()
    reduced = clean_and_reduce(raw, faces, mesher.coarse_factor)
    times["reduce_s"] = time.perf_counter() - start
    start = time.perf_counter()
    canonical, _ = normalize_mesh(reduced)  # clean_and_reduce repairs
    unwrapped, charts = compute_uv_atlas(
        canonical,
        mesher.uv_atlas_size,
        mesher.uv_partitions,
        method=mesher.uv_unwrapper,
        chart_fraction=mesher.uv_chart_fraction,
    )
    times["uv_atlas_s"] = time.perf_counter() - start
    start = time.perf_counter()
    done = ProjectionTexturer().texture(unwrapped, photo, mask, mesher.uv_atlas_size, texturer)
    times["texture_s"] = time.perf_counter() - start
    psnr, covered = _psnr(done.mesh, photo, mask, done.pose, done.intrinsics)
    return {
        "faces": int(len(unwrapped.faces)),
        "charts": charts,
        **times,
        "total_s": sum(times.values()),
        "psnr_db": psnr,
        "covered": covered,
        "front_iou": done.iou,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--grid", type=int, default=192)
    parser.add_argument("--faces", default="10000,20000,40000,100000")
    parser.add_argument("--unwrapper", default="xatlas", choices=["xatlas", "open3d"])
    parser.add_argument("--coarse-factor", type=float, default=MesherSettings().coarse_factor)
    args = parser.parse_args()
    mesher = MesherSettings(
        truth_resolution=args.grid, uv_unwrapper=args.unwrapper, coarse_factor=args.coarse_factor
    )
    # a worker pays these once, when the stage module loads (pymeshlab + hy3dgen imports, ~8 s)
    start = time.perf_counter()
    clean_and_reduce(trimesh.creation.icosphere(subdivisions=3), 100, mesher.coarse_factor)
    warm_up_s = time.perf_counter() - start
    texturer = TexturerSettings()
    with tempfile.TemporaryDirectory() as tmp:
        views, ctx, _ = synthetic_views(Path(tmp), rows=args.rows, size=512)
        rows = []
        for sample in views:
            truth = read_truth(sample.source_ref, sample.side)
            raw = TruthMesher().generate([None], [sample], mesher, 0, float("inf"))[0]
            photo = np.asarray(read_view(ctx.store, sample))
            for faces in (int(f) for f in args.faces.split(",")):
                row = {"sample": sample.sample_id, "raw_faces": int(len(raw.faces)),
                       **_one(raw, photo, truth.mask, faces, mesher, texturer)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    targets = [int(f) for f in args.faces.split(",")]
    for target in targets:
        group = rows[targets.index(target) :: len(targets)]
        summary[str(target)] = {
            key: float(np.mean([r[key] for r in group]))
            for key in ("reduce_s", "uv_atlas_s", "texture_s", "total_s", "psnr_db", "covered")
        }
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.node()} {os.cpu_count()} cpus, load average {os.getloadavg()}",
        "python": platform.python_version(),
        "settings": {
            "uv_atlas_size": mesher.uv_atlas_size,
            "uv_partitions": mesher.uv_partitions,
            "fit_resolution": texturer.fit_resolution,
            "truth_grid": args.grid,
            "coarse_factor": mesher.coarse_factor,
            "uv_chart_fraction": mesher.uv_chart_fraction,
        },  # fmt: skip
        "warm_up_s (imports, once per process, not in the rows)": warm_up_s,
        "rows": rows,
        "mean_by_target": summary,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
