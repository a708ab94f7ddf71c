"""Accuracy of the built-in estimator and of the verify stage's geometric tests on inputs that err
the way the perception networks do (issue 20): the estimator is given the mesher's surface, depth
with a backdrop, flying pixels and low-frequency error, masks that are grown, ragged and bleed.

Issue 20's targets are ADD-S < 2 % of the diameter and scale error < 3 % on >= 95 % of the
realistic cases, and an accepted set >= 98 % right at >= 85 % yield: asserted here on the realistic
primitive cases (bench/results/pose.md has the per-case tables). The synthetic source's views (its
mugs, whose handles hide behind the body in some views) are held to a floor of what the estimator
reaches there, so that a regression fails."""

import cv2
import numpy as np
import pytest

from refany3d.config import PoseSettings
from refany3d.models.pose import PoseNotFound, load_pose_estimator
from refany3d.models.pose.builtin import BuiltinPoseEstimator
from refany3d.stages.pose import estimate_pose
from refany3d.synthetic.perception_errors import DepthErrors, MaskErrors
from refany3d.testing.pose_cases import (
    NO_DEPTH_ERRORS,
    NO_MASK_ERRORS,
    Perturbation,
    make_case,
    pose_errors,
)
from refany3d.testing.pose_sets import (
    flipped,
    passes,
    primitive_cases,
    primitive_meshes,
    report,
    scaled_about_camera,
    synthetic_source_cases,
    verdict,
)

REALISTIC_TARGET = 0.95  # issue 20's target
SYNTHETIC_FLOOR = 0.8  # the synthetic source's views (see the module doc; 83 % in the bench)
PRECISION_TARGET = 0.98  # of the samples verify keeps, the share within target
YIELD_TARGET = 0.85  # of all samples, the share verify keeps


@pytest.mark.slow
def test_estimate_synthetic_source_meets_accuracy_floor(tmp_path):
    cases = synthetic_source_cases(str(tmp_path / "synthetic"), rows=12, seed=3)
    assert len(cases) >= 24
    errors = report(cases, [estimate_pose(c.mesh, c.depth, c.mask, c.intrinsics) for c in cases])
    rate = np.mean([passes(e) for e in errors])
    assert rate >= SYNTHETIC_FLOOR, f"{rate:.0%} of {len(cases)} synthetic-source samples within target"


@pytest.fixture(scope="module")
def realistic():
    cases = primitive_cases(views=3, seed=0)
    return cases, [estimate_pose(c.mesh, c.depth, c.mask, c.intrinsics) for c in cases]


def test_estimate_realistic_cases_meet_accuracy_floor(realistic):
    cases, results = realistic
    assert len(cases) >= 48
    errors = report(cases, results)
    rate = np.mean([passes(e) for e in errors])
    assert rate >= REALISTIC_TARGET, f"{rate:.0%} of {len(cases)} realistic samples within target"


# No half-turn or other symmetry of these shapes is hidden in any view: a wrong rotation is a flip.
ASYMMETRIC = ("stool-60cm", "capsule-tee-25cm", "stairs-70cm", "hammer-30cm")
# Near-symmetric shapes: where the view cannot tell a flip apart, verify must drop it.
NEAR_SYMMETRIC = ("brick-21cm", "sorter-box-15cm", "cup-handle-9cm", "mug-like-11cm", "l-bracket-12cm")


def _named(cases, results, names):
    return [(c, r) for c, r in zip(cases, results, strict=True) if c.name.rsplit("-v", 1)[0] in names]


def test_estimate_asymmetric_meshes_do_not_flip(realistic):
    chosen = _named(*realistic, ASYMMETRIC)
    errors = report(*zip(*chosen, strict=True))
    assert len(errors) == 3 * len(ASYMMETRIC)
    assert max(e.rotation_deg for e in errors) < 15.0


def test_near_symmetric_flips_are_right_or_dropped(realistic):
    """A brick, a shape-sorter box, cups: each estimate is within target or verify drops it."""
    chosen = _named(*realistic, NEAR_SYMMETRIC)
    errors = report(*zip(*chosen, strict=True))
    accepted_wrong = [
        c.name for (c, r), e in zip(chosen, errors, strict=True) if not passes(e) and verdict(c, r.pose, r.scale, r.margin) is None
    ]  # fmt: skip
    assert len(accepted_wrong) <= 1, accepted_wrong


def test_verify_keeps_a_mostly_right_set_at_a_high_yield(realistic):
    cases, results = realistic
    errors = report(cases, results)
    kept = [
        passes(e)
        for c, r, e in zip(cases, results, errors, strict=True)
        if verdict(c, r.pose, r.scale, r.margin) is None
    ]
    precision, kept_share = np.mean(kept), len(kept) / len(cases)
    print(f"accepted {len(kept)} of {len(cases)}, {np.sum(kept)} of them within target")
    assert precision >= PRECISION_TARGET and kept_share >= YIELD_TARGET, (precision, kept_share)


@pytest.mark.parametrize("factor", [1.07, 0.93, 1.1])
def test_verify_drops_a_pose_scaled_about_the_camera_as_depth_mismatch(realistic, factor):
    """The same image at another scale and distance: a silhouette cannot see it, depth can."""
    cases, results = realistic
    for case, result in zip(cases, results, strict=True):
        if verdict(case, result.pose, result.scale, None) is not None:
            continue  # dropped already as it stands
        pose, scale = scaled_about_camera(result.pose, result.scale, factor)
        rejection = verdict(case, pose, scale, None)
        assert rejection is not None and rejection[0] == "depth_mismatch", (case.name, rejection)


def test_verify_drops_flipped_poses(realistic):
    cases, results = realistic
    checked = 0
    for case, result in zip(cases, results, strict=True):
        turned = flipped(case, result.pose, result.scale)
        if turned is None or passes(pose_errors(case, turned, result.scale)):
            continue  # every half-turn is a symmetry of the shape, or this one is right anyway
        rejection = verdict(case, turned, result.scale, None)
        assert rejection is not None and rejection[0] in ("low_iou", "depth_mismatch"), (case.name, rejection)
        checked += 1
    assert checked >= 30


def test_verify_drops_a_pose_fitted_to_the_mask_of_another_object(realistic):
    cases, _ = realistic
    for index in range(0, len(cases), 6):
        case, other = cases[index], cases[(index + 4) % len(cases)]
        try:
            wrong = estimate_pose(case.mesh, other.depth, other.mask, other.intrinsics)
        except PoseNotFound:
            continue  # the pose stage drops it already (pose_failed)
        rejection = verdict(other, wrong.pose, wrong.scale, wrong.margin)
        assert rejection is not None and rejection[0] in ("low_iou", "pose_ambiguous", "depth_mismatch"), (
            case.name,
            other.name,
        )


def test_estimate_recovers_known_scale_from_clean_depth():
    mesh = primitive_meshes()["l-bracket-12cm"]
    mesh.apply_scale(3.1)  # 37 cm across: a scale no default knows
    rng = np.random.default_rng(5)
    k = np.array([[600.0, 0, 255.5], [0, 600.0, 255.5], [0, 0, 1]])
    pose = np.eye(4)
    pose[:3, :3] = np.array([[0.8, 0.0, 0.6], [0.36, 0.8, -0.48], [-0.48, 0.6, 0.64]])
    pose[:3, 3] = [0.05, -0.03, 1.2]
    clean = Perturbation(
        DepthErrors(scale=0.0, low_frequency=0.0, noise=0.002, flying_px=0, backdrop=None),
        MaskErrors(wobble_px=1.0, bias_px=0.0, ragged_px=0.0, bleed_px=0.0, bleed_arc=0.0),
        focal=0.0,
        canonical_deg=0.0,
        mesher=False,
    )
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


def test_estimate_ignores_a_uniformly_grown_mask():
    """A mask grown by 2 px all round must not read as a bigger object (the fit's outline offset)."""
    mesh = primitive_meshes()["cabinet-2m"]
    rng = np.random.default_rng(2)
    k = np.array([[600.0, 0, 255.5], [0, 600.0, 255.5], [0, 0, 1]])
    pose = np.eye(4)
    pose[:3, :3] = np.array([[0.8, 0.0, 0.6], [0.36, 0.8, -0.48], [-0.48, 0.6, 0.64]])
    pose[:3, 3] = [0.1, 0.0, 7.0]
    exact = Perturbation(NO_DEPTH_ERRORS, NO_MASK_ERRORS, focal=0.0, canonical_deg=0.0, mesher=False)
    case = make_case("grown", mesh, pose, k, 512, exact, rng)
    grown = cv2.dilate(case.mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))) > 0
    result = estimate_pose(case.mesh, case.depth, grown, case.intrinsics)
    assert result.scale == pytest.approx(case.scale, rel=0.015)


def test_estimate_without_depth_in_the_mask_raises_pose_not_found():
    case = primitive_cases(
        views=1, seed=1, perturb=Perturbation(NO_DEPTH_ERRORS, NO_MASK_ERRORS, mesher=False)
    )[2]
    with pytest.raises(PoseNotFound):
        BuiltinPoseEstimator(PoseSettings()).estimate(
            case.mesh, np.zeros_like(case.depth), case.mask, case.intrinsics
        )


def test_load_pose_estimator_caches_per_settings():
    assert load_pose_estimator(PoseSettings()) is load_pose_estimator(PoseSettings())
    assert load_pose_estimator(PoseSettings(refine_iterations=3)) is not load_pose_estimator(PoseSettings())
