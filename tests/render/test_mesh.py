import numpy as np
import pytest
import trimesh
from conftest import make_pose

from refany3d.render.cameras import intrinsics_from_fov
from refany3d.render.mesh import (
    bake_texture,
    compute_uv_atlas,
    load_mesh,
    mesh_to_glb,
    normalize_mesh,
    reduce_faces,
    repair_mesh,
)
from refany3d.render.renderer import MeshScene
from refany3d.synthetic.objects import Part, _checks, _label, assemble


@pytest.fixture(scope="module")
def textured_sphere() -> trimesh.Trimesh:
    """A closed mesh with a UV texture (checks + printed label on planar-projected faces)."""
    rng = np.random.default_rng(1)
    a = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    b = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    return assemble([Part(a, _checks(rng))]), assemble([Part(b, _label(rng))])


def _closed(mesh):
    """The geometry alone, vertices merged: closed and manifold, as UV atlas needs."""
    return repair_mesh(mesh)


@pytest.mark.parametrize("method", ["xatlas", "open3d"])
def test_compute_uv_atlas_gives_valid_charts(textured_sphere, method):
    closed = _closed(textured_sphere[0])
    assert closed.is_watertight
    unwrapped, charts = compute_uv_atlas(closed, size=512, partitions=1, method=method)
    uv = unwrapped.visual.uv
    assert uv.min() >= 0.0 and uv.max() <= 1.0 and charts >= 1
    assert len(unwrapped.faces) == len(closed.faces)
    tri = uv[unwrapped.faces]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    assert (area > 1e-9).all()  # no degenerate (collapsed) triangles in any chart
    # same 3D geometry: each face's corners are the same points as before
    np.testing.assert_allclose(unwrapped.triangles, closed.triangles, atol=1e-7)


def test_compute_uv_atlas_xatlas_is_deterministic(textured_sphere):
    """Reruns must equal fresh builds: the same mesh always gets the same atlas, byte for byte."""
    closed = _closed(textured_sphere[0])
    first, _ = compute_uv_atlas(closed, size=512)
    second, _ = compute_uv_atlas(closed.copy(), size=512)
    assert first.visual.uv.tobytes() == second.visual.uv.tobytes()
    assert np.array_equal(first.faces, second.faces) and np.array_equal(first.vertices, second.vertices)


@pytest.mark.parametrize("which", [0, 1])
def test_bake_texture_rerender_matches_original(textured_sphere, which):
    source = textured_sphere[which]
    unwrapped, _ = compute_uv_atlas(_closed(source), size=1024, partitions=1)
    baked = bake_texture(source, unwrapped, size=1024)
    k = intrinsics_from_fov(40, 128, 128)
    psnrs = []
    for euler in ([10, 20, 0], [-30, 200, 15]):
        pose = make_pose(euler, [0.0, 0.0, 1.0])
        a = MeshScene(source).render(pose, k, 128, 128, "albedo")
        b = MeshScene(baked).render(pose, k, 128, 128, "albedo")
        inside = a.mask & b.mask
        mse = ((a.rgb[inside].astype(np.float64) - b.rgb[inside]) ** 2).mean()
        psnrs.append(10 * np.log10(255.0**2 / max(mse, 1e-12)))
    assert min(psnrs) > 30.0, psnrs


def test_bake_texture_fails_on_the_wrong_source(textured_sphere):
    """The PSNR check can fail: baking the other texture gives a low score."""
    unwrapped, _ = compute_uv_atlas(_closed(textured_sphere[0]), size=256, partitions=1)
    baked = bake_texture(textured_sphere[1], unwrapped, size=256)
    k = intrinsics_from_fov(40, 96, 96)
    pose = make_pose([10, 20, 0], [0.0, 0.0, 1.0])
    a = MeshScene(textured_sphere[0]).render(pose, k, 96, 96, "albedo")
    b = MeshScene(baked).render(pose, k, 96, 96, "albedo")
    mse = ((a.rgb[a.mask].astype(np.float64) - b.rgb[a.mask]) ** 2).mean()
    assert 10 * np.log10(255.0**2 / mse) < 20.0


def test_reduce_faces_hits_target():
    mesh = trimesh.creation.icosphere(subdivisions=4)
    reduced = reduce_faces(mesh, 500)
    assert 400 <= len(reduced.faces) <= 500
    assert np.abs(np.linalg.norm(reduced.vertices, axis=1) - 1.0).max() < 0.05


def test_normalize_mesh_fits_unit_cube(textured_object):
    unit, transform = normalize_mesh(textured_object)
    lo, hi = unit.bounds
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-9)
    assert abs((hi - lo).max() - 2.0) < 1e-9
    np.testing.assert_allclose(trimesh.transform_points(textured_object.vertices, transform), unit.vertices)


@pytest.mark.parametrize("file_type", ["glb", "obj", "ply"])
def test_load_mesh_round_trips(textured_object, file_type, tmp_path):
    if file_type == "glb":
        loaded = load_mesh(mesh_to_glb(textured_object), "glb")
        assert loaded.visual.kind == "texture"
    elif file_type == "obj":
        path = tmp_path / "m.obj"
        textured_object.export(path)
        loaded = load_mesh(path)
        assert loaded.visual.kind == "texture"
    else:
        path = tmp_path / "m.ply"
        textured_object.export(path)
        loaded = load_mesh(path)
    assert len(loaded.faces) == len(textured_object.faces)
    np.testing.assert_allclose(loaded.bounds, textured_object.bounds, atol=1e-5)


def test_clean_and_reduce_hits_target_and_leaves_no_temp_files(tmp_path, monkeypatch):
    import glob
    import os
    import tempfile

    from refany3d.render.mesh import clean_and_reduce, is_manifold

    torus = trimesh.creation.torus(0.7, 0.3, major_sections=96, minor_sections=48)
    speck = trimesh.creation.icosphere(subdivisions=0, radius=0.01)
    speck.apply_translation([3, 0, 0])
    pattern = os.path.join(tempfile.gettempdir(), "tmp*.ply")
    before = set(glob.glob(pattern))
    reduced = clean_and_reduce(trimesh.util.concatenate([torus, speck]), 2000)
    assert 0.95 * 2000 <= len(reduced.faces) <= 2000  # within 5 % of the target
    assert reduced.vertices[:, 0].max() < 1.5  # the floater is gone
    assert is_manifold(repair_mesh(reduced)) and set(glob.glob(pattern)) <= before


def _rounded_box_surface(grid: int = 96) -> trimesh.Trimesh:
    """Marching cubes of a rounded box: large flat faces of tiny triangles, like a generated
    surface of a box-like object (where any collapse costs no quadric error)."""
    from skimage.measure import marching_cubes

    axis = np.linspace(-1.1, 1.1, grid)
    p = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    q = np.abs(p) - np.array([0.9, 0.5, 0.3])
    sdf = np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(axis=-1), 0.0) - 0.05
    vertices, faces, _, _ = marching_cubes(sdf, 0.0, spacing=(axis[1] - axis[0],) * 3)
    return trimesh.Trimesh(vertices - 1.1, faces, process=False)


@pytest.mark.parametrize("coarse_factor", [0.0, 4.0], ids=["face-reducer-alone", "coarse-pre-pass"])
def test_clean_and_reduce_keeps_a_flat_sided_surface_closed_and_manifold(coarse_factor):
    from refany3d.render.mesh import clean_and_reduce, is_manifold

    raw = _rounded_box_surface()
    reduced = clean_and_reduce(raw, 2000, coarse_factor)
    assert len(raw.faces) > 8 * 2000 and 0.95 * 2000 <= len(reduced.faces) <= 2000
    assert is_manifold(reduced) and reduced.is_watertight
    assert reduced.volume == pytest.approx(raw.volume, rel=0.01)


def _synthetic_surface(tmp_path, index: int, grid: int) -> trimesh.Trimesh:
    """The `truth` raw surface of synthetic view `index` at `grid` cells per side."""
    from refany3d.config import MesherSettings
    from refany3d.models.mesher.truth import TruthMesher
    from refany3d.testing.views import synthetic_views

    views, _, _ = synthetic_views(tmp_path, rows=index // 2 + 1, size=64)
    settings = MesherSettings(truth_resolution=grid)
    return TruthMesher().generate([None], views[index : index + 1], settings, 0, float("inf"))[0]


@pytest.mark.slow
def test_coarse_reduced_pulls_apart_sheets_meshoptimizer_joins(tmp_path):
    # the first synthetic object's surface at grid 192 (351k faces), brought to 40k by
    # meshoptimizer, has an edge with four faces where two nearby sheets met; pymeshlab's
    # vertex split must leave FaceReducer a manifold mesh (so the fast path holds)
    from refany3d.render.mesh import is_manifold, reduce_with_coarse_pass

    raw = _synthetic_surface(tmp_path, 0, 192)
    reduced = reduce_with_coarse_pass(raw.vertices, raw.faces, 40000, 10000)
    assert 0.95 * 10000 <= len(reduced.faces) <= 10000 and is_manifold(repair_mesh(reduced, merge=False))


def _coarse_counts(monkeypatch) -> list[int]:
    """The coarse face counts `clean_and_reduce` tries, in order (the pre-pass spied on)."""
    from refany3d.render import mesh as render_mesh

    tried, real = [], render_mesh.reduce_with_coarse_pass

    def spy(vertices, faces, coarse_faces, target_faces):
        tried.append(coarse_faces)
        return real(vertices, faces, coarse_faces, target_faces)

    monkeypatch.setattr(render_mesh, "reduce_with_coarse_pass", spy)
    return tried


def test_clean_and_reduce_retries_gentler_coarse_passes_where_one_breaks_topology(tmp_path, monkeypatch):
    # the fifth synthetic object at grid 48 (27k faces) has thin parts meshoptimizer fuses at 4k and
    # 8k faces beyond what the split repairs; at 16k it does not
    from refany3d.render.mesh import clean_and_reduce, is_manifold

    raw = _synthetic_surface(tmp_path, 4, 48)
    tried = _coarse_counts(monkeypatch)
    reduced = clean_and_reduce(raw, 2000, coarse_factor=2.0)
    assert tried == [4000, 8000, 16000]
    assert 0.95 * 2000 <= len(reduced.faces) <= 2000 and is_manifold(reduced)


def test_clean_and_reduce_falls_back_to_face_reducer_where_every_coarse_pass_breaks_topology(
    tmp_path, monkeypatch
):
    # the same object brought to 1k faces: not manifold from 2k, 4k or 8k faces even with the
    # sheets split, so FaceReducer alone must give the manifold result
    from refany3d.render.mesh import clean_and_reduce, is_manifold, reduce_with_coarse_pass

    raw = _synthetic_surface(tmp_path, 4, 48)
    coarse = reduce_with_coarse_pass(raw.vertices, raw.faces, 2000, 1000)
    assert not is_manifold(repair_mesh(coarse, merge=False))
    tried = _coarse_counts(monkeypatch)
    reduced = clean_and_reduce(raw, 1000, coarse_factor=2.0)
    assert tried == [2000, 4000, 8000]
    assert 0.95 * 1000 <= len(reduced.faces) <= 1000 and is_manifold(repair_mesh(reduced))


def test_coarse_pass_splits_the_sheets_its_collapses_pinch(tmp_path, monkeypatch):
    # the second synthetic object at grid 64 (27k faces) to 1k: the collapses pinch sheets; split
    # apart, the first pre-pass's result is manifold (merged again, it is not)
    from refany3d.render.mesh import clean_and_reduce, is_manifold

    raw = _synthetic_surface(tmp_path, 1, 64)
    tried = _coarse_counts(monkeypatch)
    reduced = clean_and_reduce(raw, 1000, coarse_factor=2.0)
    assert tried == [2000] and 0.95 * 1000 <= len(reduced.faces) <= 1000 and is_manifold(reduced)
    merged = repair_mesh(reduced)
    assert len(merged.vertices) < len(reduced.vertices) and not is_manifold(merged)


def test_coarse_reduce_is_deterministic_and_near_the_count():
    from refany3d.render.mesh import coarse_reduce

    raw = _rounded_box_surface(64)
    a = coarse_reduce(raw.vertices, raw.faces, 3000)
    b = coarse_reduce(raw.vertices, raw.faces, 3000)
    assert 0.9 * 3000 <= len(a[1]) <= 3000
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_without_needles_merges_a_needle_and_drops_a_fin():
    from refany3d.render.mesh import _without_needles

    # vertex 2 lies on the edge 0-1: the needle (0, 2, 1) sits between the fan 0-2-3, 2-1-3 above
    # and the triangle 0-1-4 below; 5-6-7 twice (opposite windings) is a fin
    v = np.array(
        [[0, 0, 0], [2, 0, 0], [1, 0, 0], [1, 1, 0], [1, -1, 0], [5, 0, 0], [6, 0, 0], [5, 1, 0]], float
    )
    f = np.array([[0, 2, 3], [2, 1, 3], [0, 2, 1], [0, 4, 1], [5, 6, 7], [6, 5, 7]])
    kept = _without_needles(v, f)
    assert {frozenset(face) for face in kept.tolist()} == {frozenset({0, 1, 3}), frozenset({0, 1, 4})}


def test_is_manifold_rejects_a_fin():
    from refany3d.render.mesh import is_manifold

    v = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [-1, 0, 0], [0, 0, 1]], float)
    fin = trimesh.Trimesh(v, [[0, 1, 2], [0, 1, 3], [0, 1, 4]], process=False)
    assert not is_manifold(fin) and is_manifold(trimesh.creation.icosphere(subdivisions=1))


def test_clean_and_reduce_of_only_degenerate_faces_is_empty():
    from refany3d.render.mesh import clean_and_reduce

    line = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [2, 0, 0]], [[0, 1, 2]], process=False)  # zero area
    assert len(clean_and_reduce(line, 100, coarse_factor=2.0).faces) == 0
