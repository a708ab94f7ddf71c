"""MeshScene's upload variants and atlas passes give the same pixels as its plain passes."""

import numpy as np
import pytest
from conftest import make_pose

from refany3d.render.cameras import intrinsics_from_fov
from refany3d.render.renderer import MeshScene, window_depth_to_z

SIZE = 96


def _camera():
    return make_pose([20, 35, -5], [0.02, 0.01, 1.0]), intrinsics_from_fov(45, SIZE, SIZE)


def test_mesh_scene_without_normals_renders_albedo_like_faceted(textured_object):
    pose, k = _camera()
    faceted = MeshScene(textured_object).render(pose, k, SIZE, SIZE, "albedo")
    bare = MeshScene(textured_object, normals="none").render(pose, k, SIZE, SIZE, "albedo")
    assert faceted.mask.sum() > 500
    assert (bare.mask == faceted.mask).all()
    np.testing.assert_allclose(bare.depth, faceted.depth, rtol=1e-6)
    assert np.abs(bare.rgb.astype(int) - faceted.rgb.astype(int)).max() <= 1


def test_mesh_scene_without_normals_refuses_lit_passes(textured_object):
    pose, k = _camera()
    with pytest.raises(ValueError, match="normals"):
        MeshScene(textured_object, normals="none").render(pose, k, SIZE, SIZE, "lit")


def test_draw_tile_matches_a_single_pass(textured_object):
    pose, k = _camera()
    scene = MeshScene(textured_object, normals="none")
    rgba, depth, near, far = scene.render_raw(pose, k, SIZE, SIZE, "albedo", background=(1.0, 1.0, 1.0))
    rgba, depth = rgba.copy(), window_depth_to_z(depth, near, far)
    other = make_pose([-30, 10, 0], [0.0, 0.0, 1.2])
    atlas = (3 * SIZE, 2 * SIZE)
    # the view under test sits in the top-right tile between two other views
    scene.draw_tile(other, k, SIZE, SIZE, atlas, (0, 0))
    planes = scene.draw_tile(pose, k, SIZE, SIZE, atlas, (2 * SIZE, SIZE), background=(1.0, 1.0, 1.0))
    scene.draw_tile(other, k, SIZE, SIZE, atlas, (SIZE, SIZE))
    tiles_rgba, tiles_depth = scene.read_atlas(*atlas)
    assert tiles_rgba.shape == (2 * SIZE, 3 * SIZE, 4)
    np.testing.assert_array_equal(tiles_rgba[SIZE:, 2 * SIZE :], rgba)
    np.testing.assert_allclose(window_depth_to_z(tiles_depth[SIZE:, 2 * SIZE :], *planes), depth, rtol=1e-6)
    # a tile's clear leaves its neighbours alone: the first view is still there
    assert (tiles_depth[:SIZE, :SIZE] < 1).any()


ENV_SCRIPT = """
import os
import refany3d.render, refany3d.render.renderer as r
assert "PYOPENGL_PLATFORM" not in os.environ, "written at import"
r.get_renderer()  # the first context: EGL, chosen here
print(os.environ["PYOPENGL_PLATFORM"], r.gl_renderer_name())
"""


def test_import_renderer_leaves_the_environment_unchanged():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYOPENGL_PLATFORM"}
    proc = subprocess.run(
        [sys.executable, "-c", ENV_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("egl ")
