"""Per-sample seconds of the verify and render stages on the CPU machine (default settings: LPIPS
AlexNet at 224², 8 orbit views of 512² RGB + point map, no turntable), wall and process CPU time.

Inputs are posed the way the pose stage hands them on (textured canonical mesh + true pose and
scale, refany3d/testing/posed.py), on two kinds of meshes:
- `synthetic`: the synthetic source's own objects at 512² views (what the demo build sees);
- `mesh_stage_like`: a 40,000-face textured torus with a 1024² atlas (what the mesh stage outputs:
  `mesher.target_faces`, `mesher.uv_atlas_size`), posed to fill a third of a 512² view;
and the whole chain calibrate + pose (the pose stage) + verify + render on the synthetic samples.

    python bench/verify_render_bench.py --out bench/results/verify_render_cpu.json [--rows 4]

The machine may be shared: the load average before and after is recorded beside the timings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn):
    """(wall s, process CPU s: all threads of this process, GL driver threads included, fn())."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, value


def summary(values: list[float]) -> dict:
    values = sorted(values)
    return {
        "median": round(statistics.median(values), 3),
        "p90": round(values[min(len(values) - 1, int(0.9 * len(values)))], 3),
        "max": round(values[-1], 3),
    }


def torus_samples(root: Path, n: int):
    """`n` posed samples of a 40k-face textured torus at random poses in 512² views."""
    from scipy.spatial.transform import Rotation

    from bench.render_bench import textured_torus
    from refany3d.config import BuildSettings
    from refany3d.records import IMAGE, Sample
    from refany3d.render.cameras import intrinsics_from_fov
    from refany3d.render.point_maps import png_bytes
    from refany3d.render.renderer import MeshScene
    from refany3d.stages.context import StageContext
    from refany3d.storage.store import ArtifactStore
    from refany3d.synthetic.objects import Part, _checks, assemble
    from refany3d.testing.posed import pose_sample

    rng = np.random.default_rng(0)
    mesh = assemble([Part(textured_torus(40000), _checks(rng))])
    mesh.apply_scale(0.25)  # metres: a 40 cm ring
    ctx = StageContext(store=ArtifactStore(str(root / "torus")), seed=0)
    k = intrinsics_from_fov(45, 512, 512)
    scene = MeshScene(mesh)
    samples = []
    for i in range(n):
        pose = np.eye(4)
        pose[:3, :3] = Rotation.from_euler("xyz", rng.uniform(-60, 60, 3), degrees=True).as_matrix()
        pose[:3, 3] = [rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), 0.65]
        out = scene.render(pose, k, 512, 512, "lit")
        base = Sample(f"torus-{i}", f"torus-{i}", "synthetic", "", side="left")
        base.artifacts[IMAGE] = ctx.store.put_content(
            "image", png_bytes(out.over(np.full_like(out.rgb, 90))), ".png"
        )
        samples.append(pose_sample(base, ctx.store, mesh, pose, k, out.mask))
    return samples, ctx, BuildSettings()


def bench(samples, ctx, settings) -> dict:
    from refany3d.stages.render import render
    from refany3d.stages.verify import verify

    verify(samples[:1], settings, ctx)  # warm-up: LPIPS load, GL context, first upload
    render(samples[:1], settings, ctx)
    rows = {"verify_wall": [], "verify_cpu": [], "render_wall": [], "render_cpu": [], "lpips": [], "iou": []}
    for s in samples:
        w, c, result = timed(lambda s=s: verify([s], settings, ctx))
        rows["verify_wall"].append(w)
        rows["verify_cpu"].append(c)
        kept = result.kept
        if kept:
            rows["lpips"].append(kept[0].metrics["lpips"])
            rows["iou"].append(kept[0].metrics["mask_iou"])
        w, c, _ = timed(lambda s=s: render([s], settings, ctx))
        rows["render_wall"].append(w)
        rows["render_cpu"].append(c)
    both_wall = [a + b for a, b in zip(rows["verify_wall"], rows["render_wall"])]
    both_cpu = [a + b for a, b in zip(rows["verify_cpu"], rows["render_cpu"])]
    return {
        "samples": len(samples),
        "verify_plus_render_wall_s": summary(both_wall),
        "verify_plus_render_cpu_s": summary(both_cpu),
        **{f"{k}_s": summary(v) for k, v in rows.items() if k not in ("lpips", "iou")},
        "mask_iou": summary(rows["iou"]),
        "lpips": summary(rows["lpips"]),
    }


def chain(samples, ctx, settings) -> dict:
    """calibrate + pose (the pose stage, from depth with a 7 % scale error) + verify + render,
    per sample, as the build runs them."""
    import io

    from refany3d.records import DEPTH
    from refany3d.stages.pose import pose
    from refany3d.stages.render import render
    from refany3d.stages.verify import verify
    from refany3d.synthetic import read_truth

    rows: dict[str, list[float]] = {"pose": [], "verify": [], "render": [], "total": [], "total_wall": []}
    kept = 0
    for s in samples:
        buf = io.BytesIO()
        np.savez(buf, depth=(read_truth(s.source_ref, s.side).depth * 1.07).astype(np.float16))
        unposed = s.replace(pose=None, mesh_scale=None)
        unposed.artifacts[DEPTH] = ctx.store.put_content("depth", buf.getvalue(), ".npz")
        wp, p, posed = timed(lambda u=unposed: pose([u], settings, ctx).kept)
        wv, v, verified = timed(lambda p=posed: verify(p, settings, ctx).kept)
        wr, r, _ = timed(lambda v=verified: render(v, settings, ctx))
        kept += len(verified)
        wall = wp + wv + wr
        for name, value in (
            ("pose", p),
            ("verify", v),
            ("render", r),
            ("total", p + v + r),
            ("total_wall", wall),
        ):
            rows[name].append(value)
    return {
        "samples": len(samples),
        "verified": kept,
        **{(f"{k}_s" if k.endswith("wall") else f"{k}_cpu_s"): summary(v) for k, v in rows.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="")
    parser.add_argument("--rows", type=int, default=4, help="synthetic pair rows (2 views each)")
    parser.add_argument("--torus", type=int, default=6, help="mesh-stage-like samples")
    args = parser.parse_args()
    from refany3d.config import override
    from refany3d.render.renderer import gl_renderer_name
    from refany3d.testing.posed import posed_samples

    root = Path(tempfile.mkdtemp(prefix="verify-render-bench-"))
    load_before = os.getloadavg()
    samples, ctx, settings = posed_samples(root / "synthetic", rows=args.rows, size=512)
    results = {"synthetic": bench(samples, ctx, settings)}
    results["synthetic"]["faces"] = "synthetic objects (composites of primitives)"
    tsamples, tctx, tsettings = torus_samples(root, args.torus)
    results["mesh_stage_like"] = bench(tsamples, tctx, tsettings)
    results["mesh_stage_like"]["faces"] = 40000
    results["calibrate_pose_verify_render_synthetic"] = chain(samples, ctx, settings)
    tt = override(settings, **{"render.turntable": True})
    from refany3d.stages.render import render

    times = [timed(lambda s=s: render([s], tt, ctx)) for s in samples[:3]]
    results["render_with_turntable_36_frames_wall_s"] = summary([t[0] for t in times])
    report = {
        "what": __doc__.splitlines()[0],
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPU cores, no GPU)",
        "gl": gl_renderer_name(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "settings": {"verify.lpips_size": settings.verify.lpips_size, "render.views": settings.render.views,
                     "render.resolution": settings.render.resolution, "view_px": 512},
        "results": results,
    }  # fmt: skip
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
