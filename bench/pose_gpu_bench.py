"""The built-in pose estimator's GPU path (`refany3d.models.pose.batched`) against its CPU path:
seconds per sample at several batch sizes, and how far the two paths' poses lie apart.

Two steps, because the GPU machine has no Open3D (its wheel is over the carry limit) and need not
build the cases:

    # here: build the realistic primitive cases, pose them on the CPU path, save both
    .venv/bin/python bench/pose_gpu_bench.py cases --views 3 --out bench/results/pose_cases.npz
    # on the GPU machine: pose the same cases on the GPU path, time it
    python3 bench/pose_gpu_bench.py gpu --cases bench/results/pose_cases.npz --json $OUT/pose_gpu.json
    # here: compare, write the table
    .venv/bin/python bench/pose_gpu_bench.py report --cases bench/results/pose_cases.npz \\
        --gpu pose_gpu.json --md bench/results/pose_gpu.md

Depth is stored as float16 (well under its 1 % noise) and both paths see the same rounded values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refany3d.config import PoseSettings  # noqa: E402


def _cases(args) -> None:
    import trimesh

    from refany3d.models.pose.builtin import BuiltinPoseEstimator
    from refany3d.testing.pose_sets import primitive_cases

    cases = primitive_cases(args.views, args.seed)
    estimator = BuiltinPoseEstimator(PoseSettings())
    arrays: dict[str, np.ndarray] = {}
    rows = []
    for i, case in enumerate(cases):
        depth = case.depth.astype(np.float16)
        mesh = trimesh.Trimesh(case.mesh.vertices, case.mesh.faces, process=False)
        cpu = time.process_time()
        found = estimator.estimate(mesh, depth.astype(np.float32), case.mask, case.intrinsics)
        cpu = time.process_time() - cpu
        arrays.update({
            f"{i}/vertices": np.asarray(mesh.vertices), f"{i}/faces": np.asarray(mesh.faces),
            f"{i}/depth": depth, f"{i}/mask": case.mask, f"{i}/intrinsics": case.intrinsics,
        })  # fmt: skip
        rows.append({
            "name": case.name, "cpu_s": cpu, "pose": found.pose.tolist(), "scale": found.scale,
            "score": found.score, "margin": found.margin,
        })  # fmt: skip
        print(f"{case.name:24s} cpu {cpu:.2f} s score {found.score:.3f}", flush=True)
    arrays["meta"] = np.frombuffer(json.dumps(rows).encode(), dtype=np.uint8)
    np.savez_compressed(args.out, **arrays)


def _load(path: str):
    import trimesh

    data = np.load(path)
    rows = json.loads(bytes(data["meta"]).decode())
    views = [
        (
            trimesh.Trimesh(data[f"{i}/vertices"], data[f"{i}/faces"], process=False),
            data[f"{i}/depth"].astype(np.float32),
            data[f"{i}/mask"],
            data[f"{i}/intrinsics"],
        )
        for i in range(len(rows))
    ]
    return views, rows


def _gpu(args) -> None:
    import torch

    from refany3d.models.pose.batched import BatchedPoseEstimator

    views, rows = _load(args.cases)
    estimator = BatchedPoseEstimator(PoseSettings(), "cuda")
    estimator.estimate_many(views[:2])  # CUDA context, kernels, solver handles
    timings = {}
    results = None
    for batch in args.batches:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = []
        for first in range(0, len(views), batch):
            out += estimator.estimate_many(views[first : first + batch])
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        timings[str(batch)] = {"wall_s": wall, "per_sample_s": wall / len(views)}
        print(f"batch {batch:3d}: {wall / len(views):.3f} s per sample", flush=True)
        if batch == args.batches[-1]:
            results = out
    assert results is not None
    poses = [
        {"error": str(r)} if isinstance(r, Exception)
        else {"pose": r.pose.tolist(), "scale": r.scale, "score": r.score, "margin": r.margin}
        for r in results
    ]  # fmt: skip
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "samples": len(views),
        "timings": timings,
        "poses": poses,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    Path(args.json).write_text(json.dumps(info, indent=1))


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    cos = (np.trace(a[:3, :3].T @ b[:3, :3]) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def _report(args) -> None:
    from refany3d.models.pose.model import PoseModel
    from refany3d.testing.pose_cases import pose_errors
    from refany3d.testing.pose_sets import passes, primitive_cases

    views, rows = _load(args.cases)
    gpu = json.loads(Path(args.gpu).read_text())
    cases = primitive_cases(args.views, args.seed)
    lines, agree, gpu_pass, cpu_pass = [], 0, 0, 0
    for case, view, cpu, g in zip(cases, views, rows, gpu["poses"], strict=True):
        if "error" in g:
            lines.append(f"| {case.name} | — | — | — | — | {g['error']} |")
            continue
        model = PoseModel(view[0])
        a, b = np.asarray(cpu["pose"]), np.asarray(g["pose"])
        # How far the GPU pose's surface lies from the CPU pose's (ADD-S, % of the diameter).
        points = model.surface[::6]
        pa = cpu["scale"] * points @ a[:3, :3].T + a[:3, 3]
        pb = g["scale"] * points @ b[:3, :3].T + b[:3, 3]
        from scipy.spatial import cKDTree

        apart = float(cKDTree(pa).query(pb)[0].mean()) / (2.0 * cpu["scale"] * model.radius)
        same = apart < args.tolerance
        agree += same
        ec, eg = pose_errors(case, a, cpu["scale"]), pose_errors(case, b, g["scale"])
        cpu_pass += passes(ec)
        gpu_pass += passes(eg)
        lines.append(
            f"| {case.name} | {_angle(a, b):.2f} | {100 * apart:.3f} | {100 * (g['scale'] / cpu['scale'] - 1):+.3f} "
            f"| {cpu['score']:.4f} / {g['score']:.4f} | {'yes' if passes(ec) else 'no'} / {'yes' if passes(eg) else 'no'} |"
        )
    n = len(rows)
    cpu_s = np.median([r["cpu_s"] for r in rows])
    timing = " · ".join(f"batch {b}: {t['per_sample_s']:.3f} s" for b, t in gpu["timings"].items())
    md = [
        "# Pose: the GPU path (torch, batched) against the CPU path (numpy, Open3D)",
        "",
        f"GPU: {gpu['device']}, torch {gpu['torch']}, {gpu['date']}; CPU reference: {platform.machine()}, "
        f"this repository's VM, built {datetime.date.today()}.",
        f"Cases: {n} realistic primitive cases (`refany3d.testing.pose_sets.primitive_cases({args.views}, {args.seed})`),",
        "the estimator given the mesher's surface; default pose settings on both paths.",
        "",
        f"- GPU seconds per sample (wall, everything from `observe` to the margin): {timing}; "
        f"peak GPU memory {gpu['peak_memory_gib']:.2f} GiB.",
        f"- CPU path: median {cpu_s:.2f} s CPU per sample on this 2-core VM.",
        f"- Agreement: {agree} of {n} GPU poses within ADD-S {100 * args.tolerance:.1f} % of the diameter of the CPU pose.",
        f"- Within target (ADD-S < 2 %, scale < 3 %): CPU path {cpu_pass} of {n}, GPU path {gpu_pass} of {n}.",
        "",
        "| case | rotation apart ° | ADD-S apart % | scale apart % | score CPU / GPU | within target CPU / GPU |",
        "|---|---|---|---|---|---|",
        *lines,
        "",
        "Rotation apart counts a symmetric shape's equivalent poses (an eraser turned half a turn); ADD-S does not.",
    ]
    Path(args.md).write_text("\n".join(md) + "\n")
    print("\n".join(md[:12]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="step", required=True)
    cases = sub.add_parser("cases")
    cases.add_argument("--views", type=int, default=3)
    cases.add_argument("--seed", type=int, default=0)
    cases.add_argument("--out", required=True)
    gpu = sub.add_parser("gpu")
    gpu.add_argument("--cases", required=True)
    gpu.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 48])
    gpu.add_argument("--json", required=True)
    report = sub.add_parser("report")
    report.add_argument("--cases", required=True)
    report.add_argument("--gpu", required=True)
    report.add_argument("--views", type=int, default=3)
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--tolerance", type=float, default=0.002)
    report.add_argument("--md", required=True)
    args = parser.parse_args()
    {"cases": _cases, "gpu": _gpu, "report": _report}[args.step](args)


if __name__ == "__main__":
    main()
