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


def test_compute_uv_atlas_gives_valid_charts(textured_sphere):
    closed = _closed(textured_sphere[0])
    assert closed.is_watertight
    unwrapped, charts = compute_uv_atlas(closed, size=512, partitions=1)
    uv = unwrapped.visual.uv
    assert uv.min() >= 0.0 and uv.max() <= 1.0 and charts >= 1
    assert len(unwrapped.faces) == len(closed.faces)
    tri = uv[unwrapped.faces]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    assert (area > 1e-9).all()  # no degenerate (collapsed) triangles in any chart
    # same 3D geometry: each face's corners are the same points as before
    np.testing.assert_allclose(unwrapped.triangles, closed.triangles, atol=1e-7)


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


def test_is_manifold_rejects_a_fin():
    from refany3d.render.mesh import is_manifold

    v = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [-1, 0, 0], [0, 0, 1]], float)
    fin = trimesh.Trimesh(v, [[0, 1, 2], [0, 1, 3], [0, 1, 4]], process=False)
    assert not is_manifold(fin) and is_manifold(trimesh.creation.icosphere(subdivisions=1))
