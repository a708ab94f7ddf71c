import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree
from skimage import measure

from refany3d.models.mesher.torch_mc import marching_cubes, triangle_table


def _grid(n: int = 40):
    g = np.linspace(-1.0, 1.0, n)
    return np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1)


def _sphere(p):
    return 0.6 - np.linalg.norm(p * [1.0, 1.0, 1.3], axis=-1)


def _torus(p):
    ring = np.hypot(p[..., 0], p[..., 2]) - 0.55
    return 0.22 - np.hypot(ring, p[..., 1])


def _box(p):
    q = np.abs(p) - [0.5, 0.35, 0.6]
    outside = np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(-1), 0.0)
    return -outside


def _outward(verts, faces) -> trimesh.Trimesh:
    """Both extractors' faces reversed, as hy3dgen's `export_to_trimesh` does."""
    return trimesh.Trimesh(np.asarray(verts), np.asarray(faces)[:, ::-1], process=False)


def _ours(volume: np.ndarray) -> trimesh.Trimesh:
    verts, faces = marching_cubes(torch.from_numpy(volume), 0.0)
    return _outward(verts.numpy(), faces.numpy())


def _skimage(volume: np.ndarray) -> trimesh.Trimesh:
    verts, faces, _, _ = measure.marching_cubes(volume, 0.0, method="lewiner")
    return _outward(verts, faces)


def _rows(v: np.ndarray) -> np.ndarray:
    return np.unique(np.round(v, 4), axis=0)


def _edge_rows(v: np.ndarray) -> np.ndarray:
    """Vertices on grid edges (two integer coordinates): Lewiner adds cube-centre vertices in
    some ambiguous cases, which no edge-based table has."""
    v = _rows(v)
    return v[(np.abs(v - np.round(v)) < 1e-6).sum(1) >= 2]


def _assert_closed_outward(mesh: trimesh.Trimesh) -> None:
    assert mesh.is_watertight
    assert mesh.is_winding_consistent
    assert mesh.volume > 0  # outward after hy3dgen's reversal, like skimage's


def test_triangle_table_matches_the_classic_sizes():
    table, counts = triangle_table()
    assert table.shape == (256, 5, 3)  # at most 5 triangles per cube, as in Lorensen's table
    assert counts[0] == counts[255] == 0
    assert counts[1] == 1 and counts[0b1111] == 2  # a corner: a triangle; a face: a quad
    assert counts[0b0001_0111] == 4  # a corner and its 3 neighbours: a hexagon
    assert counts[255 ^ 1] == 1  # complements give the same count


@pytest.mark.parametrize("code", range(256))
def test_marching_cubes_every_cube_case_is_closed_and_matches_skimage_vertices(code):
    # the configuration in the middle cube of a volume that is outside on its border: every
    # surface it makes, with its neighbours' cubes, must close
    volume = -np.ones((4, 4, 4))
    for i in range(8):
        volume[1 + (i & 1), 1 + (i >> 1 & 1), 1 + (i >> 2 & 1)] = 1.0 if code >> i & 1 else -1.0
    if code == 0:
        assert len(marching_cubes(torch.from_numpy(volume))[1]) == 0
        return
    ours, ref = _ours(volume), _skimage(volume)
    _assert_closed_outward(ours)
    np.testing.assert_allclose(_rows(ours.vertices), _edge_rows(ref.vertices), atol=1e-4)


def test_marching_cubes_random_fields_are_closed_and_consistently_wound():
    rng = np.random.default_rng(0)
    for _ in range(5):
        volume = rng.normal(size=(14, 12, 10))
        volume[[0, -1]], volume[:, [0, -1]], volume[:, :, [0, -1]] = -1.0, -1.0, -1.0
        ours = _ours(volume)
        assert ours.is_watertight and ours.is_winding_consistent
        ref = _edge_rows(_skimage(volume).vertices)
        np.testing.assert_allclose(_rows(ours.vertices), ref, atol=1e-4)


@pytest.mark.parametrize("shape", [_sphere, _torus, _box], ids=["sphere", "torus", "box"])
def test_marching_cubes_analytic_sdfs_give_skimages_surface(shape):
    volume = shape(_grid())
    ours, ref = _ours(volume), _skimage(volume)
    _assert_closed_outward(ours)
    assert ours.euler_number == ref.euler_number  # same topology (torus: 0)
    np.testing.assert_allclose(_rows(ours.vertices), _edge_rows(ref.vertices), atol=1e-4)
    # same surface: the fans differ from Lewiner's triangles only inside each cube
    a, b = (trimesh.sample.sample_surface(m, 40000, seed=0)[0] for m in (ours, ref))
    d_ab, d_ba = cKDTree(b).query(a)[0], cKDTree(a).query(b)[0]
    assert max(d_ab.max(), d_ba.max()) < 0.5  # voxels: symmetric Hausdorff of dense samples
    assert (d_ab.mean() + d_ba.mean()) / 2 < 0.1  # chamfer, at about the samples' spacing
    assert ours.volume == pytest.approx(ref.volume, rel=2e-3)
    assert ours.area == pytest.approx(ref.area, rel=5e-3)


def test_marching_cubes_skips_cubes_with_nan_corners():
    volume = _sphere(_grid(32))
    volume[np.abs(volume) > 0.2] = np.nan  # a FlashVDM-like band: NaN away from the surface
    ours = _ours(volume)
    _assert_closed_outward(ours)  # no inner shell where the band meets the NaN interior
    assert ours.volume == pytest.approx(_ours(_sphere(_grid(32))).volume)
