"""Texture a generated mesh from its one photo: fit the front camera, project, fill the unseen.

A generated mesh (Hunyuan3D, or the `truth` mesher's stand-in) lies in a canonical frame whose front
view is the input photo: y up, the camera on +z looking down -z. `fit_front_camera` finds that
camera exactly: a pinhole of a fixed field of view whose pose is aligned so the mesh's silhouette
matches the photo's mask (contour ICP: rendered and observed contours paired by nearest distance,
pose re-solved with PnP, best IoU kept). `project_texture` then paints every atlas texel the camera
sees with the photo; the rest take colours spread along the surface's edges from the nearest seen
vertices (one colour per surface point, vertices welded across chart seams: no seams).

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
    resolution: int = 256,
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


def _seen(points, normals, mask, depth, camera: FrontCamera) -> tuple[np.ndarray, np.ndarray]:
    """(seen (n,) bool, pixels (n, 2) float u, v) of surface `points` with (n, 3) `normals`: in
    front of the camera, not occluded (z within 0.5 % of the ray-cast `depth`), facing it, and
    inside `mask`."""
    height, width = mask.shape
    cam = points @ camera.pose[:3, :3].T + camera.pose[:3, 3]
    z = cam[:, 2]
    pixels = project(np.where(z[:, None] > 1e-6, cam, [0.0, 0.0, 1.0]), camera.intrinsics)
    col, row = np.rint(pixels[:, 0]).astype(int), np.rint(pixels[:, 1]).astype(int)
    inside = (z > 1e-6) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    col, row = np.clip(col, 0, width - 1), np.clip(row, 0, height - 1)
    hit = depth[row, col]
    visible = inside & (hit > 0) & (z <= hit * 1.005) & mask[row, col]
    view = points - invert_pose(camera.pose)[:3, 3]
    view /= np.maximum(np.linalg.norm(view, axis=1, keepdims=True), 1e-12)
    facing = np.abs((normals * view).sum(axis=1)) > _MIN_COS  # either winding: repair may flip parts
    return visible & facing, pixels


def _spread(colours: np.ndarray, known: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(n, 3) vertex colours with every unknown vertex given the mean of its known neighbours,
    front by front outwards from the known ones (nearest seen colour along the surface's edges)."""
    import scipy.sparse as sp

    n = len(colours)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    adjacency = sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n)).tocsr()
    adjacency = ((adjacency + adjacency.T) > 0).astype(np.float64)
    colours, known = colours.astype(np.float64), known.copy()
    while not known.all():
        weight = adjacency @ known.astype(np.float64)
        grow = ~known & (weight > 0)
        if not grow.any():  # parts the camera never saw: the mean of what it saw
            colours[~known] = colours[known].mean(axis=0)
            break
        total = adjacency @ (colours * known[:, None])
        colours[grow] = total[grow] / weight[grow, None]
        known |= grow
    return colours


def project_texture(
    mesh: trimesh.Trimesh,
    image: np.ndarray,
    mask: np.ndarray,
    camera: FrontCamera,
    size: int = 1024,
) -> tuple[trimesh.Trimesh, float]:
    """(copy of `mesh` (with UVs) textured with a size×size atlas from the (H, W, 3) uint8 photo
    `image`, fraction of atlas texels the camera saw). `mask`: (H, W) bool object pixels.

    Texels the camera sees take the photo's colour; the others interpolate vertex colours spread
    along the surface from the seen vertices. Vertices are welded by position first: the atlas
    splits them at chart seams, and one colour per surface point is what leaves no seam."""
    height, width = mask.shape
    depth = raycast_maps(mesh, camera.pose, camera.intrinsics, width, height)["depth"]
    covered, faces, points = texel_points(mesh, size)
    normals = np.asarray(mesh.face_normals)[faces]
    seen, pixels = _seen(points, normals, mask, depth, camera)
    colours = np.zeros((len(points), 3), dtype=np.float32)
    colours[seen] = _sample_pixels(image, pixels[seen])
    if not seen.all():
        colours[~seen] = _unseen_colours(mesh, faces[~seen], points[~seen], image, mask, depth, camera)
    atlas = np.zeros((size, size, 3), dtype=np.float32)
    atlas[covered] = colours
    textured = with_texture(mesh, dilate_texels(atlas, covered, steps=4))
    return textured, float(seen.mean()) if len(seen) else 0.0


def _unseen_colours(mesh, faces, points, image, mask, depth, camera: FrontCamera) -> np.ndarray:
    """(n, 3) colours of unseen texels on `faces` at `points`: barycentric mix of their welded
    corners' colours, each seen corner from the photo, the rest spread along the surface."""
    welded_vertices, weld = np.unique(np.asarray(mesh.vertices), axis=0, return_inverse=True)
    weld = weld.reshape(-1)
    welded = trimesh.Trimesh(welded_vertices, weld[np.asarray(mesh.faces)], process=False)
    known, pixels = _seen(welded_vertices, np.asarray(welded.vertex_normals), mask, depth, camera)
    vertex_colours = np.zeros((len(welded_vertices), 3))
    if known.any():
        vertex_colours[known] = _sample_pixels(image, pixels[known])
        vertex_colours = _spread(vertex_colours, known, np.asarray(welded.faces))
    else:  # the camera sees nothing of the mesh: the object's mean colour everywhere
        vertex_colours[:] = image[mask].reshape(-1, 3).mean(axis=0) if mask.any() else 127.0
    corners = np.asarray(welded.faces)[faces]  # (n, 3)
    bary = np.clip(trimesh.triangles.points_to_barycentric(welded_vertices[corners], points), 0.0, 1.0)
    bary /= np.maximum(bary.sum(axis=1, keepdims=True), 1e-12)
    return (vertex_colours[corners] * bary[..., None]).sum(axis=1).astype(np.float32)


def raycast_colours(
    mesh: trimesh.Trimesh, pose: np.ndarray, intrinsics: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rgb (H, W, 3) float32, mask (H, W) bool) of the textured `mesh` seen at `pose` with
    `intrinsics`: one ray per pixel centre, the base-colour atlas sampled bilinearly at the hit's
    UV (no mipmaps or multisampling: the texture's own colours, as projected)."""
    maps = raycast_maps(mesh, pose, intrinsics, width, height)
    hit = maps["mask"]
    faces = np.asarray(mesh.faces)[maps["face"][hit]]
    vertices = np.asarray(mesh.vertices)
    bary = trimesh.triangles.points_to_barycentric(vertices[faces], maps["xyz_canonical"][hit])
    uv = (np.asarray(mesh.visual.uv)[faces] * bary[..., None]).sum(axis=1)
    atlas = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"))
    size_v, size_u = atlas.shape[:2]
    pixels = np.stack([uv[:, 0] * size_u - 0.5, (1.0 - uv[:, 1]) * size_v - 0.5], axis=1)
    rgb = np.zeros((height, width, 3), dtype=np.float32)
    rgb[hit] = _sample_pixels(atlas, pixels)
    return rgb, hit
