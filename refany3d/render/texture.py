"""Texture a generated mesh from its one photo: fit the front camera, project, fill the unseen.

A generated mesh (Hunyuan3D, or the `truth` mesher's stand-in) lies in a canonical frame whose front
view is the input photo: y up, the camera on +z looking down -z. `fit_front_camera` finds that
camera exactly: a pinhole of a fixed field of view whose pose is aligned so the mesh's silhouette
matches the photo's mask (contour ICP: rendered and observed contours paired by nearest distance,
pose re-solved with PnP, best IoU kept). `project_texture` then paints every atlas texel the camera
sees with the photo and gives the rest the mean of the nearest seen texels on the surface (a
function of 3D position only, so charts that meet on the surface meet in colour: no seams).

Convention: OpenCV camera (x right, y down, z forward), (4, 4) canonical-to-camera poses,
intrinsics in px with pixel (i, j) centred at u=i, v=j (`refany3d.render.cameras`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh

from refany3d.render.cameras import intrinsics_from_fov, invert_pose, project
from refany3d.render.mesh import dilate_texels, texel_points, with_texture
from refany3d.render.raycast import RaycastMesh, raycast_maps

# Canonical axes (y up, camera on +z) -> OpenCV camera axes (y down, z forward).
FRONT_ROTATION = np.diag([1.0, -1.0, -1.0])
_SIMILARITY_STEPS = 4  # centroid/area updates before the contour alignment
_PATIENCE = 6  # contour iterations without a better IoU before the fit stops
_MIN_COS = 0.1  # texels seen more grazing than ~84° are treated as unseen (their colour smears)


@dataclass(frozen=True)
class FrontCamera:
    """pose: (4, 4) float64 canonical -> camera (OpenCV); intrinsics: (3, 3) float64 px of the
    photo; iou: silhouette IoU with the mask at the fitting resolution."""

    pose: np.ndarray
    intrinsics: np.ndarray
    iou: float


def _scaled_intrinsics(k: np.ndarray, factor: float) -> np.ndarray:
    """K of the same camera on an image resized by `factor` (pixel centres stay at integers)."""
    out = np.array(k, dtype=np.float64)
    out[:2, :2] *= factor
    out[:2, 2] = (out[:2, 2] + 0.5) * factor - 0.5
    return out


def _pose(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = rotation, translation
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _contour(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels of `mask` with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _nearest(contour: np.ndarray) -> np.ndarray:
    """(2, H, W) row/col of the nearest `contour` pixel for every pixel."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~contour, return_distances=False, return_indices=True)


def _similarity_start(caster, mask: np.ndarray, k: np.ndarray, radius: float) -> np.ndarray:
    """Front-rotation pose whose silhouette has the mask's centroid and area (a few updates)."""
    rows, cols = np.nonzero(mask)
    target = np.array([cols.mean(), rows.mean()])
    area = float(mask.sum())
    depth = k[0, 0] * radius / max(np.sqrt(area / np.pi), 1.0)
    centre = target
    for _ in range(_SIMILARITY_STEPS):
        t = depth * np.linalg.solve(k, [centre[0], centre[1], 1.0])
        seen = raycast_maps(caster, _pose(FRONT_ROTATION, t), k, mask.shape[1], mask.shape[0])["mask"]
        if not seen.any():
            depth *= 2.0
            continue
        r, c = np.nonzero(seen)
        centre = centre + (target - np.array([c.mean(), r.mean()]))
        depth *= np.sqrt(seen.sum() / area)
    return _pose(FRONT_ROTATION, depth * np.linalg.solve(k, [centre[0], centre[1], 1.0]))


def _contour_step(maps: dict, mask_contour: np.ndarray, to_mask: np.ndarray, k: np.ndarray, pose):
    """One ICP step: pose re-solved by PnP from contour pairs in both directions (None if degenerate)."""
    import cv2

    rendered = _contour(maps["mask"])
    rr, rc = np.nonzero(rendered)
    mr, mc = np.nonzero(mask_contour)
    if len(rr) < 6 or len(mr) < 6:
        return None
    to_rendered = _nearest(rendered)
    xyz = maps["xyz_canonical"]
    # rendered contour point -> nearest mask contour pixel; mask contour pixel -> nearest rendered point
    obj = np.concatenate([xyz[rr, rc], xyz[to_rendered[0, mr, mc], to_rendered[1, mr, mc]]])
    img = np.concatenate(
        [np.stack([to_mask[1, rr, rc], to_mask[0, rr, rc]], 1), np.stack([mc, mr], 1)]
    ).astype(np.float64)
    rvec, _ = cv2.Rodrigues(pose[:3, :3])
    ok, rvec, tvec = cv2.solvePnP(
        obj, img, k, None, rvec, pose[:3, 3].reshape(3, 1).copy(), True, cv2.SOLVEPNP_ITERATIVE
    )
    if not ok or not np.all(np.isfinite(tvec)) or tvec[2, 0] <= 0:
        return None
    return _pose(cv2.Rodrigues(rvec)[0], tvec.reshape(3))


def fit_front_camera(
    mesh: trimesh.Trimesh,
    mask: np.ndarray,
    fov_deg: float = 45.0,
    resolution: int = 128,
    iterations: int = 30,
) -> FrontCamera:
    """The camera of the photo whose (H, W) bool object `mask` shows the canonical `mesh` from the
    front: vertical FOV `fov_deg`, pose fitted to the mask at `resolution` px (longer side)."""
    import cv2

    height, width = mask.shape
    k = intrinsics_from_fov(fov_deg, width, height)
    factor = resolution / max(width, height)
    size = (max(int(round(width * factor)), 1), max(int(round(height * factor)), 1))
    small = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0.5
    if not small.any():
        raise ValueError("fit_front_camera: the mask is empty at the fitting resolution")
    k_small = _scaled_intrinsics(k, size[0] / width)
    caster = RaycastMesh(mesh)
    radius = float(np.linalg.norm(np.asarray(mesh.vertices), axis=1).max())
    pose = _similarity_start(caster, small, k_small, radius)
    mask_contour, best_iou, best, stale = _contour(small), -1.0, pose, 0
    to_mask = _nearest(mask_contour)
    for _ in range(iterations + 1):
        maps = raycast_maps(caster, pose, k_small, size[0], size[1])
        iou = _iou(maps["mask"], small)
        if iou > best_iou + 1e-4:
            best_iou, best, stale = iou, pose, 0
        else:
            stale += 1
        if stale >= _PATIENCE:
            break
        step = _contour_step(maps, mask_contour, to_mask, k_small, pose)
        if step is None:
            break
        pose = step
    return FrontCamera(best, k, max(best_iou, 0.0))


def _sample_pixels(image: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """(n, 3) float32 bilinear samples of the (H, W, 3) uint8 `image` at (n, 2) px (u, v)."""
    import cv2

    n, width = len(pixels), 4096  # remap maps are images: sides below 32767
    maps = np.zeros((-(-n // width) * width, 2), np.float32)
    maps[:n] = pixels
    maps = maps.reshape(-1, width, 2)
    out = cv2.remap(image, maps[..., 0], maps[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(-1, 3)[:n].astype(np.float32)


def _seen_texels(mesh, faces, points, mask, camera: FrontCamera) -> tuple[np.ndarray, np.ndarray]:
    """(seen (n,) bool, pixels (n, 2) float u, v) of texel `points`: in front of the camera, not
    occluded (z within 0.5 % of the ray-cast depth), facing it, and inside the eroded mask."""
    import cv2

    height, width = mask.shape
    depth = raycast_maps(mesh, camera.pose, camera.intrinsics, width, height)["depth"]
    cam = points @ camera.pose[:3, :3].T + camera.pose[:3, 3]
    z = cam[:, 2]
    pixels = project(np.where(z[:, None] > 1e-6, cam, [0.0, 0.0, 1.0]), camera.intrinsics)
    col, row = np.rint(pixels[:, 0]).astype(int), np.rint(pixels[:, 1]).astype(int)
    inside = (z > 1e-6) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    col, row = np.clip(col, 0, width - 1), np.clip(row, 0, height - 1)
    # one pixel of erosion: mask-border pixels mix object and background colours
    eroded = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    hit = depth[row, col]
    visible = inside & (hit > 0) & (z <= hit * 1.005) & eroded[row, col]
    centre = invert_pose(camera.pose)[:3, 3]
    view = points - centre
    view /= np.maximum(np.linalg.norm(view, axis=1, keepdims=True), 1e-12)
    facing = np.abs((np.asarray(mesh.face_normals)[faces] * view).sum(axis=1)) > _MIN_COS
    return visible & facing, pixels


def project_texture(
    mesh: trimesh.Trimesh,
    image: np.ndarray,
    mask: np.ndarray,
    camera: FrontCamera,
    size: int = 1024,
    neighbours: int = 8,
) -> tuple[trimesh.Trimesh, float]:
    """(copy of `mesh` (with UVs) textured with a size×size atlas from the (H, W, 3) uint8 photo
    `image`, fraction of atlas texels the camera saw). `mask`: (H, W) bool object pixels; texels
    the camera does not see take the mean colour of the `neighbours` nearest seen texels (3D)."""
    from scipy.spatial import cKDTree

    covered, faces, points = texel_points(mesh, size)
    seen, pixels = _seen_texels(mesh, faces, points, mask, camera)
    colours = np.zeros((len(points), 3), dtype=np.float32)
    if seen.any():
        colours[seen] = _sample_pixels(image, pixels[seen])
        if not seen.all():
            k = min(neighbours, int(seen.sum()))
            _, idx = cKDTree(points[seen]).query(points[~seen], k=k, workers=-1)
            colours[~seen] = colours[seen][idx.reshape(len(idx), -1)].mean(axis=1)
    else:  # the camera sees nothing of the mesh: the object's mean colour everywhere
        colours[:] = image[mask].reshape(-1, 3).mean(axis=0) if mask.any() else 127.0
    atlas = np.zeros((size, size, 3), dtype=np.float32)
    atlas[covered] = colours
    return with_texture(mesh, dilate_texels(atlas, covered, steps=4)), float(seen.mean()) if len(
        seen
    ) else 0.0
