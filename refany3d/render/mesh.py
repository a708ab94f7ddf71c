"""Mesh utilities: load, normalise, repair, reduce, UV-unwrap (Open3D UV atlas), bake textures.

Meshes are `trimesh.Trimesh` in their own frame (y up by glTF convention). Functions return new
meshes and never modify their input.
"""

from __future__ import annotations

import atexit
import glob
import io
import os
import shutil
import tempfile
import threading

import numpy as np
import trimesh
from PIL import Image


def load_mesh(source: str | os.PathLike | bytes, file_type: str | None = None) -> trimesh.Trimesh:
    """One mesh from a GLB/GLTF/OBJ/PLY path or bytes, textures kept; a scene is flattened
    (node transforms applied, parts concatenated). `file_type` is required for bytes."""
    if isinstance(source, bytes | bytearray):
        if not file_type:
            raise ValueError("load_mesh: pass file_type ('glb', 'obj', 'ply') with bytes")
        loaded = trimesh.load(io.BytesIO(source), file_type=file_type, force="mesh", process=False)
    else:
        loaded = trimesh.load(os.fspath(source), file_type=file_type, force="mesh", process=False)
    if not isinstance(loaded, trimesh.Trimesh) or len(loaded.faces) == 0:
        raise ValueError(f"load_mesh: no triangles in {source if not isinstance(source, bytes) else 'bytes'}")
    return loaded


def mesh_to_glb(mesh: trimesh.Trimesh) -> bytes:
    """GLB bytes of `mesh` (textures embedded)."""
    return mesh.export(file_type="glb")


def normalize_transform(mesh: trimesh.Trimesh) -> np.ndarray:
    """(4, 4) similarity that maps the mesh's bounding box centre to the origin and its largest
    half-extent to 1, i.e. into [-1, 1]³."""
    lo, hi = mesh.bounds
    scale = 2.0 / max(float((hi - lo).max()), 1e-12)
    out = np.eye(4)
    out[:3, :3] *= scale
    out[:3, 3] = -scale * (lo + hi) / 2.0
    return out


def normalize_mesh(mesh: trimesh.Trimesh) -> tuple[trimesh.Trimesh, np.ndarray]:
    """(copy of `mesh` inside [-1, 1]³, the (4, 4) transform applied)."""
    transform = normalize_transform(mesh)
    out = mesh.copy()
    out.apply_transform(transform)
    return out, transform


def repair_mesh(mesh: trimesh.Trimesh, merge: bool = True) -> trimesh.Trimesh:
    """Geometry-only clean-up before unwrapping: merge coincident vertices (unless `merge` is
    False: a surface whose pinches were split on purpose, `_split_pinches`, keeps them apart),
    drop degenerate and duplicate faces and unreferenced vertices, make winding consistent, fill
    small holes."""
    out = trimesh.Trimesh(mesh.vertices.copy(), mesh.faces.copy(), process=False)
    if merge:
        out.merge_vertices(merge_tex=True, merge_norm=True)
    out.update_faces(out.nondegenerate_faces() & out.unique_faces())
    out.remove_unreferenced_vertices()
    trimesh.repair.fix_winding(out)
    trimesh.repair.fill_holes(out)
    return out


def reduce_faces(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh:
    """Quadric decimation to at most `target_faces` triangles (geometry only: attributes are
    dropped, the mesh is re-textured after unwrapping)."""
    if len(mesh.faces) <= target_faces:
        return trimesh.Trimesh(mesh.vertices.copy(), mesh.faces.copy(), process=False)
    import open3d as o3d

    legacy = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(np.asarray(mesh.vertices, dtype=np.float64)),
        o3d.utility.Vector3iVector(np.asarray(mesh.faces, dtype=np.int32)),
    )
    simple = legacy.simplify_quadric_decimation(target_number_of_triangles=int(target_faces))
    simple.remove_degenerate_triangles()
    simple.remove_unreferenced_vertices()
    return trimesh.Trimesh(np.asarray(simple.vertices), np.asarray(simple.triangles), process=False)


# hy3dgen's post-processors round-trip meshes through NamedTemporaryFile(delete=False) PLYs in the
# temp directory and never delete them; one holder at a time lets us find and remove exactly ours.
_HY3DGEN_TEMP_LOCK = threading.Lock()


def own_temp_directory() -> None:
    """Give this process a temp directory of its own (removed at exit). The lock above covers
    threads, not processes: for a process that shares the temp directory with others doing the
    same work (the mesh stage's post-processing processes), a call's clean-up would remove the PLYs
    another process is still writing and reading."""
    own = tempfile.mkdtemp(prefix=f"refany3d-{os.getpid()}-")
    atexit.register(shutil.rmtree, own, ignore_errors=True)
    tempfile.tempdir = own  # this process's own setting, for the PLYs hy3dgen writes


# Multiples of the coarse count tried in turn until the result is manifold (bench/results/mesh.md,
# 2026-12-03: from ~500k faces, FaceReducer alone takes 7-13 s).
COARSE_STEPS = (1, 2, 4)


def clean_and_reduce(mesh: trimesh.Trimesh, target_faces: int, coarse_factor: float = 0.0) -> trimesh.Trimesh:
    """Hunyuan3D's clean-up of a generated surface: hy3dgen's `FloaterRemover` (parts under 0.5 %
    of the faces), `DegenerateFaceRemover`, then `FaceReducer` (pymeshlab quadric edge collapse) to
    at most `target_faces`, then `repair_mesh`. Geometry only; the temp files hy3dgen leaves
    behind are removed.

    `coarse_factor` > 1: a surface with more than `coarse_factor * target_faces` faces is first
    brought down to about that many by meshoptimizer (`reduce_with_coarse_pass`); pymeshlab's
    one-threaded edge collapse costs ~30 µs a collapse, ~9 s from the ~300k faces of a raw
    surface, and then does only the last few-fold. Where the collapses joined sheets of a thin part,
    their vertices are split apart again, before and after `FaceReducer` (`_split_pinches`; the
    repair then merges no vertices). Where the result is still not manifold, the pre-pass runs
    again to `COARSE_STEPS` times as many faces (a gentler collapse; 0.7 and 1.5 s from 500k
    faces), and only where none of them is manifold does `FaceReducer` alone reduce the surface
    (whose result is repaired and checked as it is: a raw surface that is not manifold drops)."""
    from hy3dgen.shapegen.postprocessors import DegenerateFaceRemover, FloaterRemover

    pattern = os.path.join(tempfile.gettempdir(), "tmp*.ply")
    with _HY3DGEN_TEMP_LOCK:
        before = set(glob.glob(pattern))
        try:
            # a MeshSet goes in and comes out of each step: no trimesh <-> PLY round trips
            meshes = _meshset(np.asarray(mesh.vertices), np.asarray(mesh.faces))
            meshes = DegenerateFaceRemover()(FloaterRemover()(meshes))
            cleaned = meshes.current_mesh()  # a view into `meshes`: keep that alive while used
            vertices, faces = cleaned.vertex_matrix(), cleaned.face_matrix()
            if len(faces) == 0:  # nothing left: the caller's mesh_empty
                return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), process=False)
            for step in COARSE_STEPS if coarse_factor > 1 else ():
                coarse_faces = int(step * coarse_factor * target_faces)
                if len(faces) <= coarse_faces:
                    break
                reduced = repair_mesh(
                    reduce_with_coarse_pass(vertices, faces, coarse_faces, target_faces), merge=False
                )
                if is_manifold(reduced):
                    return reduced
            return repair_mesh(_as_trimesh(_face_reduced(_meshset(vertices, faces), target_faces)))
        finally:
            for leaked in set(glob.glob(pattern)) - before:
                os.remove(leaked)


def reduce_with_coarse_pass(
    vertices: np.ndarray, faces: np.ndarray, coarse_faces: int, target_faces: int
) -> trimesh.Trimesh:
    """meshoptimizer down to about `coarse_faces` (`coarse_reduce`), then hy3dgen's `FaceReducer`
    to at most `target_faces`. Usually manifold, not always: check."""
    meshes = _meshset(*coarse_reduce(vertices, faces, coarse_faces))
    _split_pinches(meshes)
    reduced = _face_reduced(meshes, target_faces)
    _split_pinches(reduced)  # FaceReducer's last collapses can pinch the split sheets again
    return _as_trimesh(reduced)


def _split_pinches(meshes) -> None:
    """Where a collapse joined two nearby sheets (an edge of more than two faces, a vertex of two
    fans), give each sheet its own copies of the vertices (pymeshlab's split repairs). The copies
    coincide: a repair that merges coincident vertices would join the sheets again."""
    meshes.apply_filter("meshing_repair_non_manifold_edges", method="Split Vertices")
    meshes.apply_filter("meshing_repair_non_manifold_vertices")


def _face_reduced(meshes, target_faces: int):
    """hy3dgen's `FaceReducer` on a pymeshlab MeshSet (the MeshSet it returns)."""
    from hy3dgen.shapegen.postprocessors import FaceReducer

    return FaceReducer()(meshes, max_facenum=int(target_faces))


def _as_trimesh(meshes) -> trimesh.Trimesh:
    current = meshes.current_mesh()
    return trimesh.Trimesh(current.vertex_matrix(), current.face_matrix(), process=False)


def _meshset(vertices: np.ndarray, faces: np.ndarray):
    import pymeshlab

    meshes = pymeshlab.MeshSet()
    meshes.add_mesh(
        pymeshlab.Mesh(
            vertex_matrix=np.asarray(vertices, dtype=np.float64),
            face_matrix=np.asarray(faces, dtype=np.int32),
        )
    )
    return meshes


def coarse_reduce(
    vertices: np.ndarray, faces: np.ndarray, target_faces: int
) -> tuple[np.ndarray, np.ndarray]:
    """(vertices, faces) of an indexed triangle mesh simplified to about `target_faces` by
    meshoptimizer's edge collapse (quadric error, no error bound, borders kept); unreferenced
    vertices dropped. Deterministic: the same mesh always gives the same result."""
    import meshoptimizer

    indices = np.ascontiguousarray(faces, dtype=np.uint32).reshape(-1)
    positions = np.ascontiguousarray(vertices, dtype=np.float32)
    kept = np.zeros_like(indices)
    count = meshoptimizer.simplify(
        kept,
        indices,
        positions,
        target_index_count=3 * int(target_faces),
        target_error=1.0,  # relative to the mesh's extent: 1.0 = stop at the count, not at an error
        options=meshoptimizer.SIMPLIFY_LOCK_BORDER,
    )
    kept = _without_needles(np.asarray(vertices, dtype=np.float64), kept[:count].reshape(-1, 3))
    used, remapped = np.unique(kept, return_inverse=True)
    return np.asarray(vertices)[used], remapped.reshape(-1, 3).astype(np.int64)


# A triangle is a needle when twice its area is under this fraction of its longest edge squared.
_NEEDLE_RATIO = 1e-6


def _without_needles(vertices: np.ndarray, faces: np.ndarray, rounds: int = 8) -> np.ndarray:
    """`faces` after meshoptimizer without its two artefacts on flat regions (where any collapse
    costs no quadric error), each of which pymeshlab's clean-up would turn into a hole or a
    non-manifold edge:
    - needles: a vertex on its triangle's longest edge (zero area). Its vertex is merged into the
      nearer end of that edge, which removes the needle and its neighbour across the short edge.
    - fins: two triangles on the same three vertices (opposite windings). Both go."""
    for _ in range(rounds):
        corners = vertices[faces]  # (F, 3 corners, 3)
        # opposite[f, i]: length of face f's edge opposite corner i
        opposite = np.linalg.norm(corners[:, [2, 0, 1]] - corners[:, [1, 2, 0]], axis=2)
        twice_area = np.linalg.norm(
            np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1
        )
        needles = np.flatnonzero(twice_area <= _NEEDLE_RATIO * opposite.max(axis=1) ** 2)
        target = np.arange(len(vertices))
        touched = np.zeros(len(vertices), dtype=bool)
        for face in needles:  # one merge per vertex and round: merges never chain
            apex = int(opposite[face].argmax())
            c, a, b = faces[face, apex], faces[face, (apex + 1) % 3], faces[face, (apex + 2) % 3]
            if touched[[a, b, c]].any():
                continue
            to_a, to_b = np.linalg.norm(vertices[c] - vertices[[a, b]], axis=1)
            nearer = a if to_a <= to_b else b
            target[c] = nearer
            touched[[c, nearer]] = True
        faces = target[faces]
        faces = faces[
            (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 2] != faces[:, 0])
        ]
        _, group, size = np.unique(np.sort(faces, axis=1), axis=0, return_inverse=True, return_counts=True)
        fins = size[group.reshape(-1)] > 1
        faces = faces[~fins]
        if len(needles) == 0 and not fins.any():
            break
    return faces


def is_manifold(mesh: trimesh.Trimesh) -> bool:
    """Whether every edge has at most two faces and every vertex one fan of faces (Open3D's test;
    `compute_uv_atlas` needs both). Boundary edges are allowed."""
    import open3d as o3d

    legacy = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(np.asarray(mesh.vertices, dtype=np.float64)),
        o3d.utility.Vector3iVector(np.asarray(mesh.faces, dtype=np.int32)),
    )
    return bool(legacy.is_edge_manifold(allow_boundary_edges=True) and legacy.is_vertex_manifold())


def compute_uv_atlas(
    mesh: trimesh.Trimesh,
    size: int = 1024,
    partitions: int = 4,
    gutter: float = 2.0,
    max_stretch: float = 1 / 6,
    method: str = "xatlas",
    chart_fraction: float = 0.0,
) -> tuple[trimesh.Trimesh, int]:
    """(mesh with per-vertex UVs in [0, 1], number of charts).

    `method`: `xatlas` (deterministic: the same mesh always gets the same atlas) or `open3d`
    (Open3D's UVAtlas, `partitions` parallel partitions; its chart layout differs from call to
    call, so builds using it are not byte-reproducible). The input must be manifold (see
    `repair_mesh`). Vertices on chart seams are split, so the output has the same faces (same
    order) but possibly more vertices. `size`, `gutter`: atlas side and chart spacing in px.
    `chart_fraction` (xatlas): largest chart area as a fraction of the surface's (0: no cap)."""
    if method == "xatlas":
        return _xatlas_atlas(mesh, size, gutter, chart_fraction)
    if method != "open3d":
        raise ValueError(f"compute_uv_atlas: method {method!r} is not one of xatlas, open3d")
    import open3d as o3d

    tmesh = o3d.t.geometry.TriangleMesh()
    tmesh.vertex.positions = o3d.core.Tensor(np.asarray(mesh.vertices, dtype=np.float32))
    tmesh.triangle.indices = o3d.core.Tensor(np.asarray(mesh.faces, dtype=np.int64))
    _, charts, _ = tmesh.compute_uvatlas(
        size=int(size),
        gutter=float(gutter),
        max_stretch=float(max_stretch),
        parallel_partitions=int(partitions),
    )
    corner_uv = tmesh.triangle.texture_uvs.numpy().reshape(-1, 2).astype(np.float64)  # (3F, 2)
    corner_vertex = np.asarray(mesh.faces).reshape(-1)
    # one output vertex per distinct (vertex, uv) pair: seams split, interiors stay shared
    keys = np.concatenate(
        [corner_vertex[:, None].astype(np.float64), np.round(corner_uv * (1 << 20))], axis=1
    )
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    vertices = np.asarray(mesh.vertices)[corner_vertex[first]]
    out = trimesh.Trimesh(vertices, inverse.reshape(-1, 3), process=False)
    out.visual = trimesh.visual.TextureVisuals(uv=corner_uv[first])
    return out, int(charts)


def _xatlas_atlas(
    mesh: trimesh.Trimesh, size: int, gutter: float, chart_fraction: float
) -> tuple[trimesh.Trimesh, int]:
    """`compute_uv_atlas` with xatlas: faces keep their order, seam vertices are split."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.asarray(mesh.vertices, dtype=np.float32), np.asarray(mesh.faces, dtype=np.uint32))
    charts = xatlas.ChartOptions()
    # xatlas spends most of its time checking and re-splitting large charts' parameterisations
    # (3-4 s for some 10k-face objects); capped charts take a fraction of that
    charts.max_chart_area = float(chart_fraction * mesh.area) if chart_fraction > 0 else 0.0
    pack = xatlas.PackOptions()
    pack.resolution = int(size)
    pack.padding = max(0, round(gutter))
    atlas.generate(charts, pack)
    vmapping, faces, uv = atlas[0]
    out = trimesh.Trimesh(np.asarray(mesh.vertices)[vmapping], faces.astype(np.int64), process=False)
    out.visual = trimesh.visual.TextureVisuals(uv=uv.astype(np.float64))
    return out, int(atlas.chart_count)


def _uv_raster(mesh: trimesh.Trimesh, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each texel centre of a size×size atlas: (face id (size, size) int64, -1 if none;
    barycentric weights (size, size, 3)). Ray-casts the flat UV layout (no GL)."""
    import open3d as o3d

    uv = np.asarray(mesh.visual.uv, dtype=np.float64)
    flat = np.concatenate([uv, np.zeros((len(uv), 1))], axis=1).astype(np.float32)
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(flat, np.asarray(mesh.faces, dtype=np.uint32))
    # texel (row r, col c) ↔ uv ((c + .5) / size, 1 − (r + .5) / size): image rows run top-down
    cols, rows = np.meshgrid(np.arange(size), np.arange(size))
    u, v = (cols + 0.5) / size, 1.0 - (rows + 0.5) / size
    rays = np.stack([u, v, np.ones_like(u), np.zeros_like(u), np.zeros_like(u), -np.ones_like(u)], axis=-1)
    hits = scene.cast_rays(o3d.core.Tensor(rays.astype(np.float32)))
    face = hits["primitive_ids"].numpy().astype(np.int64)
    face[~np.isfinite(hits["t_hit"].numpy())] = -1
    b = hits["primitive_uvs"].numpy().astype(np.float64)  # weights of the 2nd and 3rd corner
    return face, np.stack([1.0 - b[..., 0] - b[..., 1], b[..., 0], b[..., 1]], axis=-1)


def texel_points(mesh: trimesh.Trimesh, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The surface under every covered texel of `mesh`'s size×size UV atlas: (covered (size, size)
    bool, face (n,) int64, points (n, 3) float64 in the mesh frame), n = covered.sum(), texels in
    row-major order (row 0 = v near 1)."""
    face, bary = _uv_raster(mesh, size)
    covered = face >= 0
    tri = np.asarray(mesh.vertices)[np.asarray(mesh.faces)[face[covered]]]  # (n, 3, 3)
    return covered, face[covered], (tri * bary[covered][..., None]).sum(axis=1)


def with_texture(mesh: trimesh.Trimesh, atlas: np.ndarray) -> trimesh.Trimesh:
    """Copy of `mesh` (with UVs) whose base colour is the (S, S, 3) float RGB `atlas` in [0, 255]."""
    out = mesh.copy()
    material = trimesh.visual.material.PBRMaterial(
        baseColorTexture=Image.fromarray(np.clip(atlas + 0.5, 0, 255).astype(np.uint8)),
        metallicFactor=0.0,
        roughnessFactor=0.9,
    )
    out.visual = trimesh.visual.TextureVisuals(uv=np.asarray(mesh.visual.uv), material=material)
    return out


def _surface_colors(source: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    """(n, 3) float RGB of `source` at the surface points nearest to (n, 3) `points`."""
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        np.asarray(source.vertices, dtype=np.float32), np.asarray(source.faces, dtype=np.uint32)
    )
    near = scene.compute_closest_points(o3d.core.Tensor(points.astype(np.float32)))
    face = near["primitive_ids"].numpy().astype(np.int64)
    b = near["primitive_uvs"].numpy().astype(np.float64)
    w = np.stack([1.0 - b[:, 0] - b[:, 1], b[:, 0], b[:, 1]], axis=1)[..., None]  # (n, 3, 1)
    corners = np.asarray(source.faces)[face]  # (n, 3)
    visual = source.visual
    if visual.kind == "texture" and visual.uv is not None:
        mat = visual.material
        image = getattr(mat, "baseColorTexture", None)
        image = getattr(mat, "image", None) if image is None else image
        uv = (np.asarray(visual.uv)[corners] * w).sum(axis=1)
        if image is None:
            return np.tile(np.asarray(mat.main_color[:3], dtype=np.float64), (len(points), 1))
        return _sample_bilinear(np.asarray(image.convert("RGB"), dtype=np.float64), uv)
    colors = np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3]
    return (colors[corners] * w).sum(axis=1)


def _sample_bilinear(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """(n, 3) bilinear samples of a (H, W, 3) image at (n, 2) UVs (v up, clamped, GL-style)."""
    h, w = image.shape[:2]
    x = np.clip(uv[:, 0] * w - 0.5, 0, w - 1)
    y = np.clip((1.0 - uv[:, 1]) * h - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def dilate_texels(image: np.ndarray, filled: np.ndarray, steps: int) -> np.ndarray:
    """(H, W, 3) float `image` with chart colours grown `steps` texels from the (H, W) bool `filled`
    texels into the gutter (bilinear lookups near seams stay clean)."""
    import cv2

    image, filled = image.copy(), filled.copy()
    kernel = np.ones((3, 3), np.float32)
    for _ in range(steps):
        weight = cv2.filter2D(filled.astype(np.float32), -1, kernel, borderType=cv2.BORDER_CONSTANT)
        total = cv2.filter2D(image * filled[..., None], -1, kernel, borderType=cv2.BORDER_CONSTANT)
        grow = (~filled) & (weight > 0)
        image[grow] = total[grow] / weight[grow][:, None]
        filled |= grow
    return image


def bake_texture(source: trimesh.Trimesh, target: trimesh.Trimesh, size: int = 1024) -> trimesh.Trimesh:
    """Copy of `target` (with UVs, e.g. from `compute_uv_atlas`) textured with a size×size atlas
    that samples `source`'s colour (its UV texture, else its vertex colours) at the nearest
    surface point of every texel. Both meshes in the same frame."""
    filled, _, points = texel_points(target, size)
    atlas = np.zeros((size, size, 3), dtype=np.float32)
    atlas[filled] = _surface_colors(source, points)
    return with_texture(target, dilate_texels(atlas, filled, steps=4))


def surface_colors(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    """(n, 3) float64 RGB in [0, 255] of `mesh` (its UV texture, else its vertex colours) at the
    surface points nearest to (n, 3) `points` (the mesh's frame)."""
    return _surface_colors(mesh, np.asarray(points, dtype=np.float64))
