"""Posed view samples built from the synthetic ground truth, as the pose stage would hand them on:
the SAM mask, a textured canonical mesh (CONTRACTS: bounding box centred, largest half-extent 1)
and the true pose and scale (x_cam = R (s x_canonical) + t), for the tests and benches of the
stages after pose without running the mesh and pose stages."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from refany3d.config import BuildSettings
from refany3d.records import DEPTH, MASK, MESH, Sample
from refany3d.render.mesh import mesh_to_glb, normalize_mesh
from refany3d.stages.context import StageContext
from refany3d.storage.store import ArtifactStore
from refany3d.synthetic.perception_errors import DepthErrors, erred_depth
from refany3d.testing.views import synthetic_views


def canonical_pose(true_pose: np.ndarray, to_canonical: np.ndarray) -> tuple[np.ndarray, float]:
    """(pose, mesh_scale) of the contract for a mesh moved into its canonical frame by the
    similarity `to_canonical` (x_c = c (x − m)): x_cam = R x + t = R (s x_c) + (R m + t), s = 1/c."""
    c = float(to_canonical[0, 0])
    m = -to_canonical[:3, 3] / c
    pose = np.array(true_pose, dtype=np.float64)
    pose[:3, 3] = true_pose[:3, :3] @ m + true_pose[:3, 3]
    return pose, 1.0 / c


def pose_sample(
    sample: Sample,
    store: ArtifactStore,
    mesh: trimesh.Trimesh,
    true_pose: np.ndarray,
    k: np.ndarray,
    mask,
    depth: np.ndarray | None = None,
) -> Sample:
    """`sample` with mask, canonical mesh, pose, scale and intrinsics as after the pose stage, and
    `depth` (H, W) metres as the depth stage's artifact where given."""
    canonical, to_canonical = normalize_mesh(mesh)
    pose, scale = canonical_pose(true_pose, to_canonical)
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, np.uint8) * 255).save(buf, format="PNG")
    if depth is not None:
        packed = io.BytesIO()
        np.savez_compressed(packed, depth=np.asarray(depth, np.float16))
        sample = sample.replace()
        sample.artifacts[DEPTH] = store.put_content("depth", packed.getvalue(), ".npz")
    out = sample.replace(
        pose=[float(v) for v in pose.ravel()],
        mesh_scale=scale,
        intrinsics=[float(v) for v in np.asarray(k).ravel()],
    )
    out.artifacts[MASK] = store.put_content("mask", buf.getvalue(), ".png")
    out.artifacts[MESH] = store.put_content("mesh", mesh_to_glb(canonical), ".glb")
    return out


def posed_samples(
    root: Path, rows: int = 2, size: int = 256
) -> tuple[list[Sample], StageContext, BuildSettings]:
    """View samples of `rows` synthetic pair rows, posed with their ground truth; their depth has
    the `truth` depth backend's backdrop, flying pixels and noise but no scale error (the pose is
    the true one, so the depth must be the true scene's)."""
    from refany3d.synthetic import read_truth

    views, ctx, settings = synthetic_views(root, rows, size)
    errors = dataclasses.replace(DepthErrors.of(settings.depth), scale=0.0, low_frequency=0.0)
    posed = []
    for index, s in enumerate(views):
        truth = read_truth(s.source_ref, s.side)
        depth = erred_depth(truth.depth, truth.mask, errors, np.random.default_rng(index)).depth
        posed.append(pose_sample(s, ctx.store, truth.mesh, truth.pose, truth.intrinsics, truth.mask, depth))
    return posed, ctx, settings
