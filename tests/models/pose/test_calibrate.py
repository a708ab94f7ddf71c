import numpy as np
import pytest

from refany3d.models.pose.calibrate import depth_outlier_ratio
from refany3d.synthetic.perception_errors import DepthErrors
from refany3d.testing.pose_cases import NO_MASK_ERRORS, Perturbation, make_case
from refany3d.testing.pose_sets import primitive_meshes

CLEAN = Perturbation(
    DepthErrors(scale=0.0, low_frequency=0.0, noise=0.001, flying_px=0, backdrop=None),
    NO_MASK_ERRORS,
    focal=0.0,
    canonical_deg=0.0,
    mesher=False,
)


@pytest.fixture(scope="module")
def clean_case():
    mesh = primitive_meshes()["stool-60cm"]
    k = np.array([[500.0, 0, 255.5], [0, 500.0, 255.5], [0, 0, 1]])
    pose = np.eye(4)
    pose[:3, :3] = np.array([[1.0, 0, 0], [0, -0.8, -0.6], [0, 0.6, -0.8]])
    pose[:3, 3] = [0.0, 0.0, 2.0]
    return make_case("stool", mesh, pose, k, 512, CLEAN, np.random.default_rng(0))


def test_depth_outlier_ratio_is_near_zero_at_the_true_pose(clean_case):
    c = clean_case
    assert depth_outlier_ratio(c.mesh, c.pose, c.scale, c.depth, c.mask, c.intrinsics) < 0.01


def test_depth_outlier_ratio_counts_injected_outliers(clean_case):
    c = clean_case
    rng = np.random.default_rng(1)
    depth = c.depth.copy()
    vs, us = np.nonzero(c.mask)
    pick = rng.choice(len(vs), size=len(vs) // 10, replace=False)
    depth[vs[pick], us[pick]] *= 1.5  # flying pixels / background inside the mask
    ratio = depth_outlier_ratio(c.mesh, c.pose, c.scale, depth, c.mask, c.intrinsics)
    assert ratio == pytest.approx(0.1, abs=0.015)


def test_depth_outlier_ratio_is_one_when_the_mesh_misses_the_mask(clean_case):
    c = clean_case
    away = c.pose.copy()
    away[0, 3] += 50.0
    assert depth_outlier_ratio(c.mesh, away, c.scale, c.depth, c.mask, c.intrinsics) == 1.0
