import numpy as np
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from refany3d.models.mesher.truth import remesh
from refany3d.render.cameras import intrinsics_from_fov
from refany3d.render.mesh import bake_texture, compute_uv_atlas, normalize_mesh, repair_mesh
from refany3d.render.raycast import raycast_maps
from refany3d.render.texture import FRONT_ROTATION, fit_front_camera, project_texture, raycast_colours

SIZE = 160


@pytest.fixture(scope="module")
def scene(textured_object):
    """(textured canonical object, its new untextured surface with UVs, photo, mask, true pose, K):
    the photo is the textured object seen from the front, slightly turned and off centre, through a
    50° lens (the fit assumes 45°)."""
    source, _ = normalize_mesh(textured_object)
    surface, _ = compute_uv_atlas(repair_mesh(remesh(repair_mesh(source), 48)), size=512, partitions=4)
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_euler("xyz", [4, -6, 2], degrees=True).as_matrix() @ FRONT_ROTATION
    pose[:3, 3] = [0.3, -0.2, 5.0]
    k = intrinsics_from_fov(50.0, SIZE, SIZE)
    baked = bake_texture(source, surface, size=512)
    photo, mask = raycast_colours(baked, pose, k, SIZE, SIZE)
    return surface, photo.astype(np.uint8), mask, pose, k


def test_fit_front_camera_matches_the_silhouette(scene):
    surface, _, mask, pose, _ = scene
    camera = fit_front_camera(surface, mask, fov_deg=45.0, resolution=SIZE)
    seen = raycast_maps(surface, camera.pose, camera.intrinsics, SIZE, SIZE)["mask"]
    iou = (seen & mask).sum() / (seen | mask).sum()
    assert camera.iou > 0.95 and iou > 0.95
    turn = Rotation.from_matrix(camera.pose[:3, :3] @ pose[:3, :3].T).magnitude()
    assert np.degrees(turn) < 6.0  # the 5° lens mismatch turns the viewing ray a little


def test_fit_front_camera_contour_steps_improve_the_start(scene):
    surface, _, mask, _, _ = scene
    start = fit_front_camera(surface, mask, fov_deg=45.0, resolution=SIZE, iterations=0)
    fitted = fit_front_camera(surface, mask, fov_deg=45.0, resolution=SIZE)
    assert fitted.iou > start.iou + 0.01


def _psnr(a, b):
    return 10 * np.log10(255.0**2 / ((a.astype(np.float64) - b) ** 2).mean())


def test_project_texture_rerenders_the_photo_and_fills_the_back(scene):
    surface, photo, mask, _, _ = scene
    camera = fit_front_camera(surface, mask, fov_deg=45.0, resolution=SIZE)
    textured, seen = project_texture(surface, photo, mask, camera, size=512)
    rgb, hit = raycast_colours(textured, camera.pose, camera.intrinsics, SIZE, SIZE)
    both = hit & mask
    assert _psnr(rgb[both], photo[both]) >= 25.0 and 0.2 < seen < 0.8
    # the far side is painted with the object's colours, not left black
    back = camera.pose.copy()
    back[:3, :3] = Rotation.from_euler("y", 180, degrees=True).as_matrix() @ back[:3, :3]
    far, far_hit = raycast_colours(textured, back, camera.intrinsics, SIZE, SIZE)
    assert far_hit.sum() > 100 and far[far_hit].mean() > 20


def test_project_texture_from_the_wrong_camera_fails(scene):
    surface, photo, mask, _, _ = scene
    camera = fit_front_camera(surface, mask, fov_deg=45.0, resolution=SIZE)
    shifted = camera.__class__(camera.pose.copy(), camera.intrinsics, camera.iou)
    shifted.pose[0, 3] += 0.15
    textured, _ = project_texture(surface, photo, mask, shifted, size=512)
    rgb, hit = raycast_colours(textured, camera.pose, camera.intrinsics, SIZE, SIZE)
    both = hit & mask
    assert _psnr(rgb[both], photo[both]) < 22.0


def test_raycast_colours_reads_the_atlas():
    sphere = trimesh.creation.icosphere(subdivisions=3)
    unwrapped, _ = compute_uv_atlas(sphere, size=128, partitions=1)
    red = unwrapped.copy()
    from refany3d.render.mesh import with_texture

    red = with_texture(unwrapped, np.tile(np.array([200.0, 30.0, 10.0]), (128, 128, 1)))
    pose = np.eye(4)
    pose[:3, :3], pose[2, 3] = FRONT_ROTATION, 4.0
    rgb, hit = raycast_colours(red, pose, intrinsics_from_fov(45.0, 64, 64), 64, 64)
    assert hit.sum() > 200 and np.allclose(rgb[hit], [200, 30, 10], atol=1)
