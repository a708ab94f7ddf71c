import numpy as np

from refany3d.render.cameras import (
    backproject,
    intrinsics_from_fov,
    invert_pose,
    look_at,
    project,
    transform_points,
)


def test_look_at_centres_target_and_keeps_up_up():
    pose = look_at([0.0, 1.0, 3.0], [0.0, 0.0, 0.0])
    k = intrinsics_from_fov(40, 65, 65)
    center = project(transform_points(np.zeros((1, 3)), pose), k)[0]
    np.testing.assert_allclose(center, [32.0, 32.0], atol=1e-9)
    above = project(transform_points(np.array([[0.0, 0.5, 0.0]]), pose), k)[0]
    assert above[1] < 32.0  # object +y appears higher in the image (smaller v)
    np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-12)
    assert np.linalg.det(pose[:3, :3]) > 0


def test_intrinsics_from_fov_spans_the_image():
    k = intrinsics_from_fov(90, 100, 100)
    edge = project(np.array([[1.0, 0.0, 1.0]]), k)[0, 0]  # 45° off axis
    assert abs(edge - (k[0, 2] + 50.0)) < 1e-9


def test_backproject_inverts_project():
    k = intrinsics_from_fov(50, 40, 30)
    depth = np.full((30, 40), 2.5, dtype=np.float32)
    xyz = backproject(depth, k)
    uv = project(xyz.reshape(-1, 3), k).reshape(30, 40, 2)
    cols, rows = np.meshgrid(np.arange(40), np.arange(30))
    np.testing.assert_allclose(uv[..., 0], cols, atol=1e-4)
    np.testing.assert_allclose(uv[..., 1], rows, atol=1e-4)


def test_invert_pose_round_trips():
    pose = look_at([1.0, 2.0, -3.0], [0.1, 0.2, 0.3])
    np.testing.assert_allclose(invert_pose(pose) @ pose, np.eye(4), atol=1e-12)
