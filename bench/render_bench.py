"""Rendering benchmark: 512² renders of a 50k-face textured mesh, ray-cast point maps, UV atlas
timings, and one full sample's renders (scene point map + N orbit views × RGB/point map +
verification renders) against the targets (≤ 1.5 s CPU, ≤ 50 ms H100): the old path (MeshScene.render
per view, `full_sample`) and the fast path (`refany3d.render.sample.render_sample`, `full_sample_fast`).

    python bench/render_bench.py --out bench/results/render_cpu.json [--skip-uvatlas] [--skip-raycast]

Runs wherever pyrender has an EGL context: Mesa llvmpipe on CPU machines, NVIDIA EGL on GPUs.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import statistics
import time

import numpy as np
import trimesh

from refany3d.config import RenderSettings
from refany3d.render.cameras import intrinsics_from_fov
from refany3d.render.orbit import render_orbit_views
from refany3d.render.point_maps import point_map_from_depth
from refany3d.render.renderer import MeshScene, gl_renderer_name
from refany3d.render.sample import render_sample
from refany3d.synthetic.objects import Part, _checks, assemble

TORUS = (0.6, 0.25)  # major, minor radius; axis z


def textured_torus(faces: int) -> trimesh.Trimesh:
    """A closed torus with about `faces` triangles (2 × major × minor sections)."""
    minor = max(8, int(np.sqrt(faces / 2 / 2.5)))
    major = max(8, int(round(faces / 2 / minor)))
    return trimesh.creation.torus(*TORUS, major_sections=major, minor_sections=minor)


def timed(fn, repeat: int) -> float:
    """Median wall time of `fn()` in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return round(statistics.median(times), 2)


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


def sample_camera(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(pose, K) of the benchmark's "estimated pose" view."""
    k = intrinsics_from_fov(45, size, size)
    pose = np.eye(4)
    pose[:3, :3] = trimesh.transformations.rotation_matrix(0.6, [1, 1, 0])[:3, :3]
    pose[:3, 3] = [0.1, 0.0, 3.0]
    return pose, k


def bench_full_sample(mesh: trimesh.Trimesh, size: int, views: int, repeat: int) -> dict:
    """Old path. One sample: upload once; scene point map at the estimated pose; `views` orbit
    views (lit RGB + canonical point map); verification renders (lit RGB + exact mask at the pose)."""
    pose, k = sample_camera(size)

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


def bench_full_sample_fast(
    mesh: trimesh.Trimesh, size: int, views: int, repeat: int, profile: bool = False
) -> dict:
    """Fast path: `render_sample` (upload included) per orbit shading / antialiasing; for the
    default also the time with the mesh already uploaded (passes + host post-processing)."""
    pose, k = sample_camera(size)
    out: dict = {"views": views, "includes_upload": True}
    for name, extra in (
        ("albedo", {}),
        ("albedo_antialias", {"antialias": True}),
        ("lit", {"orbit_shading": "lit"}),
    ):
        settings = RenderSettings(resolution=size, views=views, **extra)
        ms = timed(lambda st=settings: render_sample(mesh, pose, k, size, size, st), repeat)
        passes = (1 + views) * (2 if settings.antialias else 1)
        out[name] = {"ms": ms, "gl_passes": passes}
    settings = RenderSettings(resolution=size, views=views)
    scene = MeshScene(mesh, normals="none")  # as render_sample uploads it for unlit orbit views
    # agreement with the old exact path on this GL (pixel-centre geometry pass)
    fast = render_sample(mesh, pose, k, size, size, settings, scene=scene)
    old = MeshScene(mesh).render(pose, k, size, size, "geometry")
    both = fast.scene_mask & old.mask
    err = np.abs(fast.scene_point_map - point_map_from_depth(old.depth, k, pose))[both].max()
    iou = (fast.scene_mask & old.mask).sum() / (fast.scene_mask | old.mask).sum()
    out["vs_old_geometry"] = {"mask_iou": round(float(iou), 5), "point_map_max_abs_err": float(err)}
    # which one is on the surface: distance of canonical points from the analytic torus (the
    # 50k-face tessellation itself deviates by < 2e-4); needs no ray caster on the device
    for name, xyz in (
        ("fast", fast.scene_point_map[both]),
        ("old", point_map_from_depth(old.depth, k, pose)[both]),
    ):
        ring = np.hypot(xyz[:, 0], xyz[:, 1]) - TORUS[0]
        off = np.abs(np.hypot(ring, xyz[:, 2]) - TORUS[1])
        out["vs_old_geometry"][f"{name}_torus_dist_q99"] = float(np.quantile(off, 0.99))
        out["vs_old_geometry"][f"{name}_torus_dist_max"] = float(off.max())
    out["albedo"]["uploaded_ms"] = timed(
        lambda: render_sample(mesh, pose, k, size, size, settings, scene=scene), repeat
    )
    out["albedo"]["upload_ms"] = timed(
        lambda: MeshScene(mesh, normals="none").render_raw(pose, k, 64, 64, "geometry"), repeat
    )
    out["albedo"]["breakdown_ms"] = atlas_breakdown(scene, mesh, pose, k, size, settings, repeat)
    if profile:  # where a sample's time goes (upload included), by own time
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(repeat):
            render_sample(mesh, pose, k, size, size, settings)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        out["albedo"]["profile_top"] = text.getvalue().splitlines()[:45]
    return out


def atlas_breakdown(scene, mesh, pose, k, size: int, settings: RenderSettings, repeat: int) -> dict:
    """Median ms of the three parts of `render_sample`'s atlas path on an uploaded mesh: queueing the
    passes, the one read-back (it waits for the GPU), and finishing the views on the host."""
    from refany3d.render import sample as fast

    out = {}
    for _ in range(repeat + 1):
        captured: dict = {}
        real_read, real_pool = scene.read_atlas, fast._host_pool

        def read(*args, real_read=real_read, captured=captured):
            captured["drawn"] = time.perf_counter()
            result = real_read(*args)
            captured["read"] = time.perf_counter()
            return result

        scene.read_atlas = read
        start = time.perf_counter()
        render_sample(mesh, pose, k, size, size, settings, scene=scene)
        end = time.perf_counter()
        del scene.read_atlas  # back to the method
        assert fast._host_pool is real_pool
        for name, a, b in (
            ("draw", start, captured["drawn"]),
            ("read", captured["drawn"], captured["read"]),
            ("finish", captured["read"], end),
        ):
            out.setdefault(name, []).append((b - a) * 1000.0)
    return {name: round(statistics.median(v[1:]), 2) for name, v in out.items()}


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
    ap.add_argument("--skip-renders", action="store_true", help="skip the single-render timings")
    ap.add_argument("--profile", action="store_true", help="cProfile the fast full sample")
    ap.add_argument("--skip-raycast", action="store_true")
    ap.add_argument("--skip-old-sample", action="store_true", help="skip the old full-sample path")
    args = ap.parse_args()

    mesh = assemble([Part(textured_torus(args.faces), _checks(np.random.default_rng(0)))])
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": args.machine or platform.node(),
        "cpu_count": os.cpu_count(),
        "gl_renderer": gl_renderer_name(),
        "size": args.size,
        "mesh_faces": len(mesh.faces),
        "renders": {} if args.skip_renders else bench_renders(mesh, args.size, args.repeat),
        "full_sample_fast": bench_full_sample_fast(mesh, args.size, args.views, args.repeat, args.profile),
    }
    if not args.skip_old_sample:
        result["full_sample"] = bench_full_sample(mesh, args.size, args.views, max(2, args.repeat // 2))
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
