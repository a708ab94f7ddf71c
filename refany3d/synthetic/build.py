"""Generate the synthetic source: objects at random 6D poses over random backgrounds, packed as
Subjects200K pair rows, with the ground truth of every view beside them."""

from __future__ import annotations

import io
import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import trimesh
from PIL import Image
from scipy.spatial.transform import Rotation
from tqdm.auto import tqdm

from refany3d.records import subjects200k_schema
from refany3d.render.cameras import intrinsics_from_fov
from refany3d.render.renderer import Light, MeshScene
from refany3d.storage.fs import url_to_fs
from refany3d.synthetic.objects import OBJECTS, ObjectSpec, build_object

VIEW_SIZE = 512
ROWS_PER_FILE = 64
ROW_GROUP = 8
MARKER = "_SYNTHETIC.json"
# Padding per collection, like the released data (p is derived per image by the split stage).
COLLECTIONS = (("collection_1", 8), ("collection_2", 16))
LOW_QUALITY_PROB = 0.15

TRUTH_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("side", pa.string()),
        ("mesh_glb", pa.binary()),
        ("pose", pa.list_(pa.float64(), 16)),
        ("intrinsics", pa.list_(pa.float64(), 9)),
        ("mask", pa.binary()),
        ("depth", pa.binary()),
    ]
)


# --------------------------------------------------------------------------- one view


def _random_pose(rng: np.random.Generator, mesh: trimesh.Trimesh, k: np.ndarray, size: int) -> np.ndarray:
    """Object-to-camera pose (OpenCV): the object roughly upright, seen from above at a random
    azimuth, tilted and rolled a little, filling 40–75 % of the view, off centre."""
    yaw, pitch, roll = rng.uniform(0, 360), rng.uniform(5, 40), rng.uniform(-15, 15)
    upright = np.diag([1.0, -1.0, -1.0])  # object y up → image up, object +z → towards camera
    rot = Rotation.from_euler("x", -pitch, degrees=True).as_matrix() @ upright
    rot = rot @ Rotation.from_euler("zy", [roll, yaw], degrees=True).as_matrix()
    center = mesh.bounds.mean(axis=0)
    radius = float(np.linalg.norm(mesh.vertices - center, axis=1).max())
    fill = rng.uniform(0.2, 0.37)  # projected radius / view side
    dist = k[0, 0] * radius / (fill * size)
    shift = (0.5 - fill) * 0.6 * size
    u, v = k[0, 2] + rng.uniform(-shift, shift), k[1, 2] + rng.uniform(-shift, shift)
    pose = np.eye(4)
    pose[:3, :3] = rot
    pose[:3, 3] = dist * np.linalg.solve(k, [u, v, 1.0]) - rot @ center
    return pose


def _random_lights(rng: np.random.Generator) -> tuple[tuple[Light, ...], float]:
    lights = []
    for _ in range(int(rng.integers(1, 3))):
        direction = (rng.uniform(-1, 1), rng.uniform(-0.2, 1), rng.uniform(0.3, 1.0))
        tint = tuple(float(c) for c in 1.0 - rng.uniform(0, 0.15, size=3))
        lights.append(Light(direction, float(rng.uniform(1.5, 4.0)), tint))
    return tuple(lights), float(rng.uniform(0.2, 0.5))


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """(size, size, 3) uint8 background and a few words describing it."""
    kind = ("gradient", "noise", "floor")[int(rng.integers(3))]
    a, b = rng.integers(40, 240, size=(2, 3)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / max(size - 1, 1)
    if kind == "gradient":
        t = (yy * np.cos(rng.uniform(0, np.pi)) + xx * np.sin(rng.uniform(0, np.pi))) % 1.0
        img, words = a + (b - a) * t[..., None], "a softly lit studio backdrop"
    elif kind == "noise":
        coarse = rng.normal(0, 1, size=(9, 9)).astype(np.float32)
        up = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
        img, words = a + 25.0 * up[..., None], "a textured wall"
    else:  # tiled floor receding towards a horizon
        horizon = rng.uniform(0.2, 0.45)
        depth = np.maximum(yy - horizon, 1e-3)
        tiles = np.floor((xx - 0.5) / depth * 0.4) + np.floor(0.25 / depth)
        floor = np.where((tiles % 2 == 0)[..., None], a, b)
        img = np.where((yy < horizon)[..., None], (a + b) / 2 + 30, floor)
        words = "a tiled floor"
    return np.clip(img, 0, 255).astype(np.uint8), words


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _view(
    scene: MeshScene, mesh: trimesh.Trimesh, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, dict, str]:
    """Render one view: (rgb (S, S, 3) uint8, truth fields, background words)."""
    k = intrinsics_from_fov(rng.uniform(35, 55), size, size)
    pose = _random_pose(rng, mesh, k, size)
    lights, ambient = _random_lights(rng)
    background, words = _background(rng, size)
    out = scene.render(pose, k, size, size, "lit", lights, ambient)
    truth = {
        "pose": pose.reshape(-1).tolist(),
        "intrinsics": k.reshape(-1).tolist(),
        "mask": _png(out.mask.astype(np.uint8) * 255),
        "depth": _npy(out.depth.astype(np.float32)),
    }
    return out.over(background), truth, words


def _pair(views: list[np.ndarray], pad: int) -> bytes:
    """Two S×S views side by side on a white canvas: W = 2S + 3p, H = S + 2p."""
    size = views[0].shape[0]
    canvas = np.full((size + 2 * pad, 2 * size + 3 * pad, 3), 255, dtype=np.uint8)
    canvas[pad : pad + size, pad : pad + size] = views[0]
    canvas[pad : pad + size, 2 * pad + size : 2 * pad + 2 * size] = views[1]
    return _png(canvas)


def _row(index: int, seed: int, size: int) -> tuple[dict, list[dict]]:
    """One pair row and its two truth rows; deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    spec: ObjectSpec = OBJECTS[int(rng.integers(len(OBJECTS)))]
    mesh = build_object(spec, rng)
    glb = mesh.export(file_type="glb")
    scene = MeshScene(mesh)
    collection, pad = COLLECTIONS[int(rng.integers(len(COLLECTIONS)))]
    views, truths, captions = [], [], []
    for side in ("left", "right"):
        rgb, truth, words = _view(scene, mesh, rng, size)
        views.append(rgb)
        truths.append({"side": side, "mesh_glb": glb, **truth})
        captions.append(f"A {spec.item} photographed against {words}, its colourful pattern clearly visible.")
    scores = [5, 5, 5] if rng.random() >= LOW_QUALITY_PROB else rng.integers(2, 5, size=3).tolist()
    row = {
        "image": {"bytes": _pair(views, pad), "path": None},
        "collection": collection,
        "quality_assessment": dict(zip(("compositeStructure", "objectConsistency", "imageQuality"), scores)),
        "description": {
            "item": spec.item,
            "description_0": captions[0],
            "description_1": captions[1],
            "category": spec.category,
            "description_valid": True,
        },
    }
    return row, truths


# --------------------------------------------------------------------------- files


def _write_table(fs, path: str, table: pa.Table) -> None:
    """Write atomically (temporary name, then rename): readers never see a partial file."""
    tmp = f"{path}.tmp"
    with fs.open(tmp, "wb") as fh:
        pq.write_table(table, fh, row_group_size=ROW_GROUP)
    fs.mv(tmp, path)


def generate(out_dir: str, n: int, seed: int, *, view_size: int = VIEW_SIZE, progress: bool = True) -> None:
    """Write `n` Subjects200K-format pair rows to `out_dir/data/synthetic-XXXXX.parquet` and their
    ground truth (two rows per pair row: `row` is the index within the data file) to
    `out_dir/truth/<same name>`. Deterministic for (`n`, `seed`, `view_size`); any fsspec URL."""
    fs, root = url_to_fs(out_dir)
    for sub in ("data", "truth"):
        fs.makedirs(posixpath.join(root, sub), exist_ok=True)
    bar = tqdm(total=n, desc="synthetic rows", unit="row", disable=not progress or None)
    for file_index, start in enumerate(range(0, n, ROWS_PER_FILE)):
        rows, truths = [], []
        for offset, index in enumerate(range(start, min(start + ROWS_PER_FILE, n))):
            row, views = _row(index, seed, view_size)
            rows.append(row)
            truths += [{"row": offset, **view} for view in views]
            bar.update(1)
        name = f"synthetic-{file_index:05d}.parquet"
        _write_table(
            fs, posixpath.join(root, "truth", name), pa.Table.from_pylist(truths, schema=TRUTH_SCHEMA)
        )
        _write_table(
            fs, posixpath.join(root, "data", name), pa.Table.from_pylist(rows, schema=subjects200k_schema())
        )
    bar.close()


def generator_fingerprint() -> str:
    """Hash of the generator's code: this module and every package module it imports (objects,
    renderer, cameras), docstrings and comments left out (`stages/keys.py`)."""
    from refany3d.code_fingerprints import module_fingerprint

    return module_fingerprint(__name__)


def ensure_synthetic(
    root: str, n: int, seed: int, *, view_size: int = VIEW_SIZE, code: str | None = None
) -> str:
    """Generate into `root` unless its marker says the same (n, seed, view_size) was generated
    there by the same generator code (`code`, default `generator_fingerprint()`); returns the glob
    of the data files. The marker is written after the data (the unit of resume)."""
    fs, path = url_to_fs(root)
    marker = posixpath.join(path, MARKER)
    code = generator_fingerprint() if code is None else code
    want = {"n": n, "seed": seed, "view_size": view_size, "code": code}
    done = fs.exists(marker) and json.loads(fs.cat_file(marker)) == want
    if not done:
        for sub in ("data", "truth"):  # stale files of another (n, seed) must not join the glob
            if fs.exists(posixpath.join(path, sub)):
                fs.rm(posixpath.join(path, sub), recursive=True)
        if fs.exists(marker):
            fs.rm(marker)
        generate(root, n, seed, view_size=view_size)
        with fs.open(marker, "w") as fh:
            fh.write(json.dumps(want))
    return f"{root.rstrip('/')}/data/*.parquet"
