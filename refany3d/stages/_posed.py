"""What verify and render read of a posed sample: the view, the SAM mask, the canonical mesh and
the camera, with the estimated similarity pose turned into a rigid one.

The pose stage's `pose` maps canonical mesh coordinates multiplied by `mesh_scale` s into the
camera: x_cam = R (s x) + t (CONTRACTS). A projection cannot tell s from distance, so the
canonical mesh seen at the rigid pose [R | t / s] gives the same image and mask, its depth is
z / s, and its point maps are canonical coordinates directly: no scaled mesh copy is made.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import trimesh
from PIL import Image

from refany3d.records import IMAGE, MASK, MESH, Sample
from refany3d.render.mesh import load_mesh
from refany3d.storage.store import ArtifactStore


@dataclass(frozen=True)
class PosedView:
    """image (H, W, 3) uint8 RGB; mask (H, W) bool SAM mask; mesh: canonical, textured; pose (4, 4)
    rigid canonical-to-camera (OpenCV); scale: metres per canonical unit; intrinsics (3, 3) px."""

    image: np.ndarray
    mask: np.ndarray
    mesh: trimesh.Trimesh
    pose: np.ndarray
    scale: float
    intrinsics: np.ndarray


def missing_inputs(sample: Sample) -> str:
    """What a posed sample lacks ('' when nothing): pose, scale, intrinsics or an artifact."""
    fields = {"pose": sample.pose, "mesh_scale": sample.mesh_scale, "intrinsics": sample.intrinsics}
    lacking = [name for name, value in fields.items() if value is None]
    lacking += [f"artifacts[{role!r}]" for role in (IMAGE, MASK, MESH) if role not in sample.artifacts]
    if sample.mesh_scale is not None and not sample.mesh_scale > 0:
        lacking.append(f"a positive mesh_scale (got {sample.mesh_scale})")
    return ", ".join(lacking)


def rigid_pose(pose: np.ndarray, scale: float) -> np.ndarray:
    """(4, 4) rigid canonical-to-camera pose [R | t / s] of the similarity x_cam = R (s x) + t."""
    out = np.array(pose, dtype=np.float64).reshape(4, 4)
    out[:3, 3] /= float(scale)
    return out


def read_posed(sample: Sample, store: ArtifactStore) -> PosedView:
    """The sample's view, mask, canonical mesh and rigid pose (see `missing_inputs` first)."""
    image = np.asarray(Image.open(io.BytesIO(store.get(sample.artifacts[IMAGE]))).convert("RGB"))
    mask = np.asarray(Image.open(io.BytesIO(store.get(sample.artifacts[MASK]))).convert("L")) > 127
    mesh = load_mesh(store.get(sample.artifacts[MESH]), file_type="glb")
    scale = float(sample.mesh_scale)
    return PosedView(
        image=image,
        mask=mask,
        mesh=mesh,
        pose=rigid_pose(np.asarray(sample.pose), scale),
        scale=scale,
        intrinsics=np.asarray(sample.intrinsics, dtype=np.float64).reshape(3, 3),
    )
