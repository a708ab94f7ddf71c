"""Rasterised and ray-cast geometry agree: the tests fail if intrinsics, pose conventions or pixel
centres are off by a flip, a transpose or half a pixel."""

import numpy as np
from conftest import make_pose

from refany3d.render.cameras import backproject, intrinsics_from_fov, transform_points
from refany3d.render.raycast import raycast_maps
from refany3d.render.renderer import MeshScene

SIZE = 160


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_raycast_mask_matches_pyrender_mask(textured_object):
    k = intrinsics_from_fov(45, SIZE, SIZE)
    k[0, 2] += 7.0  # off-centre principal point: catches a cx/cy mix-up
    scene = MeshScene(textured_object)
    for euler, t in (([20, 35, 5], [0.02, -0.05, 0.9]), ([-60, 170, 30], [-0.04, 0.03, 1.1])):
        pose = make_pose(euler, t)
        ray = raycast_maps(textured_object, pose, k, SIZE, SIZE)
        for mode in ("lit", "geometry"):
            rendered = scene.render(pose, k, SIZE, SIZE, mode)
            assert ray["mask"].sum() > 500
            assert _iou(rendered.mask, ray["mask"]) > 0.99


def test_backprojected_depth_reproduces_camera_point_map(textured_object):
    k = intrinsics_from_fov(40, SIZE, SIZE)
    pose = make_pose([15, -40, 10], [0.0, -0.1, 1.0])
    rendered = MeshScene(textured_object).render(pose, k, SIZE, SIZE, "geometry")
    ray = raycast_maps(textured_object, pose, k, SIZE, SIZE)
    both = rendered.mask & ray["mask"]
    xyz = backproject(rendered.depth, k)[both]
    ref = ray["xyz_camera"][both]
    err = np.linalg.norm(xyz - ref, axis=1) / np.linalg.norm(ref, axis=1)
    # pixels whose ray grazes an edge may hit another face in each method; the rest must agree
    assert np.quantile(err, 0.99) < 1e-4 and np.median(err) < 1e-5


def test_canonical_point_map_through_pose_lands_on_camera_map(textured_object):
    k = intrinsics_from_fov(40, SIZE, SIZE)
    pose = make_pose([70, 10, -20], [0.05, 0.0, 1.2])
    ray = raycast_maps(textured_object, pose, k, SIZE, SIZE)
    mask = ray["mask"]
    mapped = transform_points(ray["xyz_canonical"][mask].astype(np.float64), pose)
    np.testing.assert_allclose(mapped, ray["xyz_camera"][mask], atol=1e-5)
    # canonical points lie on the mesh surface
    import open3d as o3d

    surface = o3d.t.geometry.RaycastingScene()
    surface.add_triangles(
        textured_object.vertices.astype(np.float32), textured_object.faces.astype(np.uint32)
    )
    dist = surface.compute_distance(o3d.core.Tensor(ray["xyz_canonical"][mask])).numpy()
    assert dist.max() < 1e-5
    assert (ray["depth"][~mask] == 0).all() and (ray["face"][~mask] == -1).all()
