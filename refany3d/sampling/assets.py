"""A user's 3D asset as the model's conditions: load, normalise like the dataset, render the orbit.

Any GLB/GLTF/OBJ/PLY mesh (textured or vertex-coloured) is loaded as one mesh, normalised into
[-1, 1]^3 (bounding-box centre at the origin, largest half-extent 1: the canonical frame of the
dataset's meshes), and rendered in N orbit views with the dataset's renderer and settings
(`render_sample`): RGB on white and a canonical point map, each axis normalised over the
normalised mesh's bounding box to [0, 1] with a white background (DESIGN §5).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import trimesh

from refany3d.config import RenderSettings
from refany3d.render.mesh import load_mesh, normalize_mesh
from refany3d.render.point_maps import normalize_point_map
from refany3d.render.sample import render_sample


class AssetError(ValueError):
    """An asset file that cannot be a condition (missing, unreadable, empty, no faces)."""


@dataclass(frozen=True)
class ConditionViews:
    """rgb: N (R, R, 3) uint8 orbit views on white; point_maps: N (R, R, 3) float32 in [0, 1]
    (white off the object); poses: N (4, 4) object-to-camera (OpenCV) of the normalised mesh."""

    rgb: list[np.ndarray]
    point_maps: list[np.ndarray]
    poses: list[np.ndarray]


def load_asset(path: str | os.PathLike) -> trimesh.Trimesh:
    """The mesh in `path`, normalised into [-1, 1]^3; `AssetError` naming the file otherwise."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise AssetError(f"asset {name!r}: no such file")
    if os.path.getsize(name) == 0:
        raise AssetError(f"asset {name!r}: empty file")
    try:
        mesh = load_mesh(name)
    except ValueError as err:
        if "no triangles" in str(err):
            raise AssetError(f"asset {name!r}: no faces (a mesh with triangles is needed)") from None
        raise AssetError(f"asset {name!r}: unreadable ({err})") from None
    except Exception as err:  # noqa: BLE001 - trimesh raises many types on a broken file
        raise AssetError(f"asset {name!r}: unreadable ({type(err).__name__}: {err})") from None
    if not np.isfinite(mesh.vertices).all() or float(np.ptp(mesh.vertices, axis=0).max()) <= 0:
        raise AssetError(f"asset {name!r}: degenerate geometry (non-finite or zero-size vertices)")
    return normalize_mesh(mesh)[0]


def render_conditions(mesh: trimesh.Trimesh, settings: RenderSettings) -> ConditionViews:
    """The `settings.views` orbit views of `mesh` (normalised) at `settings.resolution` px;
    `AssetError` when a view shows none of it (a blank condition the model never trained on)."""
    # render_sample also draws a scene view; a 4x4 one from the first orbit camera costs nothing
    k = np.array([[4.0, 0, 1.5], [0, 4.0, 1.5], [0, 0, 1]])
    pose = np.eye(4)
    pose[2, 3] = settings.distance
    renders = render_sample(mesh, pose, k, 4, 4, settings)
    empty = [i for i, mask in enumerate(renders.orbit_masks) if not mask.any()]
    if empty:
        raise AssetError(
            f"asset: orbit view(s) {', '.join(map(str, empty))} of {len(renders.orbit_masks)} show "
            "nothing of it (a flat or open mesh seen edge-on or from behind); give a mesh with a "
            "surface all round"
        )
    lo, hi = mesh.bounds
    maps = [
        normalize_point_map(xyz, mask, lo, hi)
        for xyz, mask in zip(renders.orbit_point_maps, renders.orbit_masks)
    ]
    return ConditionViews(rgb=list(renders.orbit_rgb), point_maps=maps, poses=list(renders.orbit_poses))
