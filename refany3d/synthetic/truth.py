"""Read the synthetic source's ground truth of one view back (used by the `truth` backends)."""

from __future__ import annotations

import functools
import io
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import trimesh
from PIL import Image

from refany3d.storage.fs import url_to_fs

SIDES = ("left", "right")


@dataclass(frozen=True)
class TruthView:
    """Ground truth of one S×S view.

    mesh: the object in its own (canonical) frame, metres, loaded on first use (most readers need
    only the mask or depth, and a textured mesh is costly to decode and leaves reference cycles).
    pose: (4, 4) float64 object-to-camera, OpenCV (x right, y down, z forward). intrinsics: (3, 3)
    float64, pixels of the view (pixel (i, j) centre at u=i, v=j). mask: (S, S) bool. depth: (S, S)
    float32 z-depth in metres, 0 where empty.
    """

    pose: np.ndarray
    intrinsics: np.ndarray
    mask: np.ndarray
    depth: np.ndarray
    mesh_at: tuple[str, int, int]  # (truth file url, row group, offset) of the mesh cell

    @property
    def mesh(self) -> trimesh.Trimesh:
        return _load_mesh(*self.mesh_at)


def truth_url(data_url: str) -> str:
    """`…/data/X.parquet` → `…/truth/X.parquet` (same protocol)."""
    head, name = posixpath.split(data_url)
    parent, folder = posixpath.split(head)
    if folder != "data":
        raise ValueError(f"{data_url!r} is not a synthetic data file (expected …/data/<name>.parquet)")
    return posixpath.join(parent, "truth", name)


@functools.lru_cache(maxsize=4)
def _truth_index(url: str) -> dict[tuple[int, str], tuple[int, int]]:
    """(row, side) → (row group, offset) of one truth file; only the key columns are read."""
    fs, path = url_to_fs(url)
    index: dict[tuple[int, str], tuple[int, int]] = {}
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        for group in range(pf.num_row_groups):
            keys = pf.read_row_group(group, columns=["row", "side"]).to_pydict()
            for offset, (row, side) in enumerate(zip(keys["row"], keys["side"])):
                index[(int(row), str(side))] = (group, offset)
    return index


@functools.lru_cache(maxsize=64)
def _load_mesh(url: str, group: int, offset: int) -> trimesh.Trimesh:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as fh:
        cell = pq.ParquetFile(fh).read_row_group(group, columns=["mesh_glb"]).column(0)[offset].as_py()
    return trimesh.load(io.BytesIO(cell), file_type="glb", force="mesh", process=False)


def read_truth(source_ref: str, side: str) -> TruthView:
    """Ground truth of `side` ('left'/'right') of the pair row `source_ref` (`<data url>#<row>`).

    Reads one row group of the truth file beside the data file; the file's key index and recent
    meshes (read on first use of `.mesh`) are cached per process, pixel arrays are not (memory
    stays flat over a build).
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    data_url, sep, row_text = source_ref.rpartition("#")
    if not sep or not row_text.isdigit():
        raise ValueError(f"source_ref {source_ref!r} is not '<data url>#<row index>'")
    url = truth_url(data_url)
    try:
        group, offset = _truth_index(url)[(int(row_text), side)]
    except KeyError:
        raise KeyError(f"no ground truth for row {row_text} side {side} in {url}") from None
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as fh:
        cols = ["pose", "intrinsics", "mask", "depth"]
        rec = pq.ParquetFile(fh).read_row_group(group, columns=cols).slice(offset, 1).to_pylist()[0]
    mask = np.asarray(Image.open(io.BytesIO(rec["mask"]))) > 127
    depth = np.load(io.BytesIO(rec["depth"]), allow_pickle=False).astype(np.float32)
    return TruthView(
        pose=np.asarray(rec["pose"], dtype=np.float64).reshape(4, 4),
        intrinsics=np.asarray(rec["intrinsics"], dtype=np.float64).reshape(3, 3),
        mask=mask,
        depth=depth,
        mesh_at=(url, group, offset),
    )
