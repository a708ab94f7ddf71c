"""The depth silhouette: the segmenter's outline moved to where the depth shows the object's edge."""

import numpy as np
import pytest
import trimesh

from refany3d.models.pose.observe import depth_silhouette
from refany3d.render.cameras import intrinsics_from_fov
from refany3d.render.raycast import raycast_maps
from refany3d.synthetic.perception_errors import DepthErrors, MaskErrors, erred_depth, erred_mask

SIZE = 256
NETWORK_DEPTH = DepthErrors(scale=0.1, low_frequency=0.01, noise=0.01, flying_px=3, backdrop=(1.15, 2.0))


def _view(seed: int = 0):
    """An exact mask and depth of a box turned towards the camera (no backdrop: 0 off it)."""
    box = trimesh.creation.box([0.3, 0.2, 0.25])
    pose = np.eye(4)
    pose[:3, :3] = trimesh.transformations.euler_matrix(0.5, 0.7, 0.2)[:3, :3]
    pose[:3, 3] = [0.05, -0.03, 1.2]
    maps = raycast_maps(box, pose, intrinsics_from_fov(45, SIZE, SIZE), SIZE, SIZE)
    return maps["mask"], maps["depth"]


def _wrong_pixels(mask, truth) -> int:
    return int((mask ^ truth).sum())


@pytest.mark.parametrize("bias_px", [3.0, -3.0])
def test_a_grown_or_shrunk_bleeding_mask_moves_to_the_depth_edge(bias_px):
    truth, exact = _view()
    rng = np.random.default_rng(0)
    depth = erred_depth(exact, truth, NETWORK_DEPTH, rng).depth.astype(np.float64)
    grown = erred_mask(truth, MaskErrors(1.5, 0.0, 1.0, 5.0, 0.5), rng)
    given = erred_mask(grown, MaskErrors(0.0, 0.0, 0.0, 0.0, 0.0), rng)  # copy
    given = _biased(given, bias_px)
    refined = depth_silhouette(given, depth)
    assert _wrong_pixels(given, truth) > 300
    assert _wrong_pixels(refined, truth) < 0.25 * _wrong_pixels(given, truth), (
        _wrong_pixels(given, truth), _wrong_pixels(refined, truth),
    )  # fmt: skip


def _biased(mask, px: float):
    import cv2

    m = mask.astype(np.uint8)
    signed = cv2.distanceTransform(m, cv2.DIST_L2, 3) - cv2.distanceTransform(1 - m, cv2.DIST_L2, 3)
    return signed + px > 0


def test_without_a_backdrop_or_a_depth_step_the_mask_stands():
    truth, exact = _view()
    given = _biased(truth, 3.0)
    assert (depth_silhouette(given, exact) == given).all()  # depth 0 off the object: no backdrop
    # a tile lying on a table seen from above: the table 2 % behind it, less than a depth edge
    tile = trimesh.creation.box([0.3, 0.2, 0.01])
    pose = np.eye(4)
    pose[:3, 3] = [0.0, 0.0, 1.0]
    maps = raycast_maps(tile, pose, intrinsics_from_fov(45, SIZE, SIZE), SIZE, SIZE)
    given = _biased(maps["mask"], 3.0)
    on_table = np.where(maps["mask"], maps["depth"], 1.02 * maps["depth"].max())
    assert (depth_silhouette(given, on_table) == given).all()
