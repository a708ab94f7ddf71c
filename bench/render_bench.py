"""Rendering benchmark: 512² renders of a 50k-face textured mesh, ray-cast point maps, UV atlas
timings, and one full sample's renders (scene point map + N orbit views × RGB/point map +
verification renders) against the targets (≤ 1.5 s CPU, ≤ 50 ms H100).

    python bench/render_bench.py --out bench/results/render_cpu.json [--skip-uvatlas] [--skip-raycast]

Runs wherever pyrender has an EGL context: Mesa llvmpipe on CPU machines, NVIDIA EGL on GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import numpy as np
import trimesh

from refany3d.render.cameras import intrinsics_from_fov
from refany3d.render.orbit import render_orbit_views
from refany3d.render.point_maps import point_map_from_depth
from refany3d.render.renderer import MeshScene, get_renderer
from refany3d.synthetic.objects import Part, _checks, assemble


def textured_torus(faces: int) -> trimesh.Trimesh:
    """A closed torus with about `faces` triangles (2 × major × minor sections)."""
    minor = max(8, int(np.sqrt(faces / 2 / 2.5)))
    major = max(8, int(round(faces / 2 / minor)))
    return trimesh.creation.torus(0.6, 0.25, major_sections=major, minor_sections=minor)


def timed(fn, repeat: int) -> float:
    """Median wall time of `fn()` in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return round(statistics.median(times), 2)


def gl_renderer_name() -> str:
    from OpenGL.GL import GL_RENDERER, glGetString

    r = get_renderer()
    r._platform.make_current()  # bench-only peek at the context
    name = glGetString(GL_RENDERER)
    return name.decode() if isinstance(name, bytes) else str(name)


def bench_renders(mesh: trimesh.Trimesh, size: int, repeat: int) -> dict:
    scene = MeshScene(mesh)
    k = intrinsics_from_fov(40, size, size)
    pose = np.eye(4)
    pose[:3, 3] = [0.0, 0.0, 3.0]
    out = {}
    for name, mode, exact in (
        ("lit_rgb_depth_mask_exact", "lit", True),
        ("lit_rgb_depth_mask_single_pass", "lit", False),
        ("albedo_rgb_depth_mask_exact", "albedo", True),
        ("geometry_depth_mask", "geometry", True),
    ):
        ms = timed(lambda m=mode, e=exact: scene.render(pose, k, size, size, m, exact=e), repeat)
        out[name] = {"ms": ms, "per_second": round(1000.0 / ms, 1)}
    return out


def bench_full_sample(mesh: trimesh.Trimesh, size: int, views: int, repeat: int) -> dict:
    """One sample: upload once; scene point map at the estimated pose; `views` orbit views (lit
    RGB + canonical point map); verification renders (lit RGB + exact mask at the pose)."""
    k = intrinsics_from_fov(45, size, size)
    pose = np.eye(4)
    pose[:3, :3] = trimesh.transformations.rotation_matrix(0.6, [1, 1, 0])[:3, :3]
    pose[:3, 3] = [0.1, 0.0, 3.0]

    def sample() -> None:
        scene = MeshScene(mesh)
        geo = scene.render(pose, k, size, size, "geometry")
        point_map_from_depth(geo.depth, k, pose)
        render_orbit_views(mesh, views, size, scene=scene)
        scene.render(pose, k, size, size, "lit")

    scene = MeshScene(mesh)
    orbit = [v.pose for v in render_orbit_views(mesh, views, size, scene=scene)]
    k_orbit = intrinsics_from_fov(40, size, size)

    def gl_only() -> None:  # the same passes on an uploaded mesh, no numpy post-processing
        scene.render(pose, k, size, size, "geometry")
        for p in orbit:
            scene.render(p, k_orbit, size, size, "lit")
        scene.render(pose, k, size, size, "lit")

    return {
        "ms": timed(sample, repeat),
        "gl_passes_only_ms": timed(gl_only, repeat),
        "upload_ms": timed(lambda: MeshScene(mesh).render(pose, k, 64, 64, "geometry"), repeat),
        "gl_passes": 1 + 2 * views + 2,
        "views": views,
        "includes_upload": True,
    }


def bench_raycast(mesh: trimesh.Trimesh, size: int, repeat: int) -> dict:
    from refany3d.render.raycast import RaycastMesh, raycast_maps

    k = intrinsics_from_fov(40, size, size)
    pose = np.eye(4)
    pose[:3, 3] = [0.0, 0.0, 3.0]
    caster = RaycastMesh(mesh)
    return {
        "build_ms": timed(lambda: RaycastMesh(mesh), repeat),
        "point_map_ms": timed(lambda: raycast_maps(caster, pose, k, size, size), repeat),
    }


def bench_uvatlas(partitions: int) -> dict:
    from refany3d.render.mesh import compute_uv_atlas

    out = {}
    for faces in (10_000, 40_000, 100_000):
        mesh = textured_torus(faces)
        start = time.perf_counter()
        _, charts = compute_uv_atlas(mesh, size=1024, partitions=partitions)
        out[str(len(mesh.faces))] = {"s": round(time.perf_counter() - start, 2), "charts": charts}
    return {"partitions": partitions, "by_faces": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--faces", type=int, default=50_000)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--machine", default="", help="free-text machine label")
    ap.add_argument("--skip-uvatlas", action="store_true")
    ap.add_argument("--skip-raycast", action="store_true")
    args = ap.parse_args()

    mesh = assemble([Part(textured_torus(args.faces), _checks(np.random.default_rng(0)))])
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": args.machine or platform.node(),
        "cpu_count": os.cpu_count(),
        "gl_renderer": gl_renderer_name(),
        "size": args.size,
        "mesh_faces": len(mesh.faces),
        "renders": bench_renders(mesh, args.size, args.repeat),
        "full_sample": bench_full_sample(mesh, args.size, args.views, max(2, args.repeat // 2)),
    }
    if not args.skip_raycast:
        result["raycast"] = bench_raycast(mesh, args.size, args.repeat)
    if not args.skip_uvatlas:
        result["uvatlas"] = bench_uvatlas(4)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
