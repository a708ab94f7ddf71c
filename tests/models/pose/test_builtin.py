"""Accuracy of the built-in estimator (issue 13's target: ADD-S < 2 % of the diameter and scale
error < 3 % on >= 95 % of samples), on the synthetic source and on meshes built here."""

import numpy as np
import pytest

from refany3d.config import PoseSettings
from refany3d.models.pose import PoseNotFound, load_pose_estimator
from refany3d.models.pose.builtin import BuiltinPoseEstimator
from refany3d.stages.pose import estimate_pose
from refany3d.synthetic.pose_cases import Perturbation, make_case
from tests.models.pose._cases import passes, primitive_cases, primitive_meshes, report, synthetic_source_cases

TARGET = 0.95


@pytest.mark.slow
def test_estimate_synthetic_source_meets_accuracy_target(tmp_path):
    cases = synthetic_source_cases(str(tmp_path / "synthetic"), rows=12, seed=3)
    assert len(cases) >= 24
    errors = report(cases, [estimate_pose(c.mesh, c.depth, c.mask, c.intrinsics) for c in cases])
    rate = np.mean([passes(e) for e in errors])
    assert rate >= TARGET, f"{rate:.0%} of {len(cases)} synthetic-source samples within target"
    # A mug with its handle hidden and a bottle look the same turned; nothing else may flip.
    turned = [c.name for c, e in zip(cases, errors, strict=True) if e.rotation_deg > 5.0]
    assert all(name.startswith(("ceramic mug", "water bottle")) for name in turned), turned


@pytest.fixture(scope="module")
def primitives():
    cases = primitive_cases(views=2, seed=0)
    return cases, [estimate_pose(c.mesh, c.depth, c.mask, c.intrinsics) for c in cases]


def test_estimate_primitive_meshes_meet_accuracy_target(primitives):
    cases, results = primitives
    errors = report(cases, results)
    rate = np.mean([passes(e) for e in errors])
    assert rate >= TARGET, f"{rate:.0%} of {len(cases)} primitive-mesh samples within target"


# Their shape has no symmetry that any of these views hides: a wrong rotation would be a flip.
ASYMMETRIC = ("l-bracket-12cm", "stool-60cm", "capsule-tee-25cm", "stairs-70cm")


def test_estimate_asymmetric_meshes_do_not_flip(primitives):
    cases, results = primitives
    chosen = [(c, r) for c, r in zip(cases, results, strict=True) if c.name.rsplit("-v", 1)[0] in ASYMMETRIC]
    errors = report(*zip(*chosen, strict=True))
    assert len(errors) == 2 * len(ASYMMETRIC)
    assert max(e.rotation_deg for e in errors) < 5.0


def test_estimate_recovers_known_scale_from_clean_depth():
    mesh = primitive_meshes()["l-bracket-12cm"]
    mesh.apply_scale(3.1)  # 37 cm across: a scale no default knows
    rng = np.random.default_rng(5)
    k = np.array([[600.0, 0, 255.5], [0, 600.0, 255.5], [0, 0, 1]])
    pose = np.eye(4)
    pose[:3, :3] = np.array([[0.8, 0.0, 0.6], [0.36, 0.8, -0.48], [-0.48, 0.6, 0.64]])
    pose[:3, 3] = [0.05, -0.03, 1.2]
    clean = Perturbation(depth_scale=0.0, focal=0.0, depth_noise=0.002, mask_px=1.0, canonical_deg=0.0)
    case = make_case("known-scale", mesh, pose, k, 512, clean, rng)
    result = estimate_pose(case.mesh, case.depth, case.mask, case.intrinsics)
    # The canonical mesh spans 2 units along its largest extent: metres per unit = half of it.
    assert result.scale == pytest.approx(case.scale, rel=0.01)
    assert result.scale == pytest.approx(float(np.ptp(mesh.vertices, axis=0).max()) / 2, rel=0.02)
    # Depth 20 % too far scales the answer with it: the calibration follows the depth.
    far = make_case("known-scale", mesh, pose, k, 512, clean, np.random.default_rng(5))
    farther = estimate_pose(far.mesh, far.depth * 1.2, far.mask, far.intrinsics)
    assert farther.scale == pytest.approx(1.2 * result.scale, rel=0.01)
    assert farther.pose[2, 3] == pytest.approx(1.2 * result.pose[2, 3], rel=0.01)


def test_estimate_without_depth_in_the_mask_raises_pose_not_found():
    case = primitive_cases(views=1, seed=1)[2]
    with pytest.raises(PoseNotFound):
        BuiltinPoseEstimator(PoseSettings()).estimate(
            case.mesh, np.zeros_like(case.depth), case.mask, case.intrinsics
        )


def test_load_pose_estimator_caches_per_settings():
    assert load_pose_estimator(PoseSettings()) is load_pose_estimator(PoseSettings())
    assert load_pose_estimator(PoseSettings(refine_iterations=3)) is not load_pose_estimator(PoseSettings())
