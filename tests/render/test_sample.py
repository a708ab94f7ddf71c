"""The fast full-sample path agrees with the slower exact functions (ray caster, MeshScene.render,
render_orbit_views): it fails on a flipped row order, a wrong pose inverse, off-centre samples or
swapped channels."""

import cv2
import numpy as np
import pytest
from conftest import make_pose

from refany3d.config import RenderSettings, SettingsError
from refany3d.render.cameras import intrinsics_from_fov
from refany3d.render.orbit import render_orbit_views
from refany3d.render.raycast import raycast_maps
from refany3d.render.renderer import MeshScene
from refany3d.render.sample import render_sample

SIZE = 120
ORBIT = RenderSettings(resolution=64, views=4, elevation_deg=25.0, distance=2.6, fov_deg=40.0)


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _interior(mask):
    return cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0


def _scene_camera():
    k = intrinsics_from_fov(45, SIZE, SIZE)
    k[0, 2] += 6.0  # off-centre principal point: catches a cx/cy mix-up
    return make_pose([25, -50, 10], [0.03, -0.04, 1.0]), k


@pytest.fixture(scope="module")
def sample(textured_object):
    pose, k = _scene_camera()
    return render_sample(textured_object, pose, k, SIZE, SIZE, ORBIT)


def test_render_sample_scene_point_map_matches_raycast(textured_object, sample):
    pose, k = _scene_camera()
    ray = raycast_maps(textured_object, pose, k, SIZE, SIZE)
    assert ray["mask"].sum() > 500
    assert _iou(sample.scene_mask, ray["mask"]) > 0.99
    assert (sample.object_mask == sample.scene_mask).all()
    both = sample.scene_mask & ray["mask"]
    err = np.linalg.norm(sample.scene_point_map[both] - ray["xyz_canonical"][both], axis=1)
    rel = err / np.linalg.norm(ray["xyz_camera"][both], axis=1)
    assert np.quantile(rel, 0.99) < 1e-4 and np.median(rel) < 1e-5
    np.testing.assert_allclose(sample.scene_depth[both], ray["depth"][both], rtol=1e-4)
    assert (sample.scene_point_map[~sample.scene_mask] == 0).all() and (
        sample.scene_depth[~sample.scene_mask] == 0
    ).all()


def test_render_sample_object_rgb_matches_albedo_render(textured_object, sample):
    pose, k = _scene_camera()
    ref = MeshScene(textured_object).render(pose, k, SIZE, SIZE, "albedo")
    inner = _interior(sample.object_mask & ref.mask)
    diff = np.abs(sample.object_rgb.astype(int) - ref.rgb.astype(int))[inner]
    assert sample.object_rgb.shape == (SIZE, SIZE, 3) and sample.object_rgb.dtype == np.uint8
    # interiors agree; texture edges differ (one sample vs 4x multisampling), hence the mean bound
    assert np.median(diff) <= 2 and diff.mean() < 8
    assert (sample.object_rgb[~sample.object_mask] == 0).all()


def test_render_sample_orbit_matches_render_orbit_views(textured_object, sample):
    ref = render_orbit_views(textured_object, 4, 64, 25.0, 2.6, 40.0, mode="albedo")
    assert len(sample.orbit_rgb) == len(sample.orbit_point_maps) == len(sample.orbit_masks) == 4
    np.testing.assert_allclose(sample.orbit_intrinsics, ref[0].intrinsics)
    for rgb, xyz, mask, pose, view in zip(
        sample.orbit_rgb, sample.orbit_point_maps, sample.orbit_masks, sample.orbit_poses, ref
    ):
        np.testing.assert_allclose(pose, view.pose, atol=1e-12)
        assert rgb.shape == (64, 64, 3) and xyz.shape == (64, 64, 3) and xyz.dtype == np.float32
        assert _iou(mask, view.mask) > 0.99
        both = mask & view.mask
        np.testing.assert_allclose(xyz[both], view.point_map[both], atol=1e-4)
        assert (xyz[~mask] == 0).all() and (rgb[~mask] == 255).all()
        diff = np.abs(rgb.astype(int) - view.rgb.astype(int))[_interior(both)]
        assert np.median(diff) <= 2
    # and against the ray caster: canonical positions, not just self-consistency
    pose = sample.orbit_poses[1]
    ray = raycast_maps(textured_object, pose, sample.orbit_intrinsics, 64, 64)
    both = ray["mask"] & sample.orbit_masks[1]
    assert _iou(ray["mask"], sample.orbit_masks[1]) > 0.99
    np.testing.assert_allclose(sample.orbit_point_maps[1][both], ray["xyz_canonical"][both], atol=1e-4)


def test_render_sample_antialias_keeps_exact_geometry(textured_object, sample):
    pose, k = _scene_camera()
    smooth = render_sample(
        textured_object, pose, k, SIZE, SIZE, RenderSettings(**{**vars(ORBIT), "antialias": True})
    )
    assert (smooth.scene_mask == sample.scene_mask).all()
    np.testing.assert_allclose(smooth.scene_point_map, sample.scene_point_map, atol=1e-6)
    for a, b, mask in zip(smooth.orbit_rgb, sample.orbit_rgb, sample.orbit_masks):
        edge = ~_interior(mask) & cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert np.median(np.abs(a.astype(int) - b.astype(int))[_interior(mask)]) <= 2
        assert (a[edge] != b[edge]).any()  # multisampled edges are blended with the white background


def test_render_sample_lit_orbit_matches_lit_views(textured_object):
    pose, k = _scene_camera()
    settings = RenderSettings(**{**vars(ORBIT), "views": 2, "orbit_shading": "lit"})
    lit = render_sample(textured_object, pose, k, SIZE, SIZE, settings)
    ref = render_orbit_views(textured_object, 2, 64, 25.0, 2.6, 40.0, mode="lit")
    for rgb, mask, view in zip(lit.orbit_rgb, lit.orbit_masks, ref):
        diff = np.abs(rgb.astype(int) - view.rgb.astype(int))[_interior(mask & view.mask)]
        assert np.median(diff) <= 2


def test_render_settings_orbit_shading_is_validated():
    assert RenderSettings().orbit_shading == "albedo" and RenderSettings().antialias is False
    with pytest.raises(SettingsError, match="orbit_shading"):
        RenderSettings(orbit_shading="phong")


def test_render_sample_from_two_threads_matches_sequential(textured_object):
    """The process's one GL context and its read-back buffers are shared: concurrent samples (the
    flow's thread runner) must not see each other's passes."""
    from concurrent.futures import ThreadPoolExecutor

    k = intrinsics_from_fov(45, SIZE, SIZE)
    poses = [make_pose([25 * i, -40 + 15 * i, 10], [0.02 * i, -0.03, 1.0 + 0.1 * i]) for i in range(4)]
    settings = RenderSettings(**{**vars(ORBIT), "views": 2})
    expected = [render_sample(textured_object, p, k, SIZE, SIZE, settings) for p in poses]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda p: render_sample(textured_object, p, k, SIZE, SIZE, settings), poses * 2))
    for a, b in zip(got, expected * 2, strict=True):
        assert (a.scene_mask == b.scene_mask).all()
        np.testing.assert_array_equal(a.scene_point_map, b.scene_point_map)
        for x, y in zip(a.orbit_rgb, b.orbit_rgb, strict=True):
            np.testing.assert_array_equal(x, y)
