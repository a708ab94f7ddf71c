"""The built-in estimator's GPU path (`batched`, torch) against its CPU path (numpy, Open3D): the
same rasterised hits, the same distances, the same poses, alone or in a batch. Run on the CPU
here; the CUDA test runs where CUDA exists."""

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from refany3d.config import BuildSettings, PoseSettings, override
from refany3d.models.pose import PoseNotFound, load_pose_estimator
from refany3d.models.pose.batched import (
    BatchedPoseEstimator,
    _cast,
    _Poses,
    _rank,
    _Views,
    _visible,
    point_mesh_distance,
)
from refany3d.models.pose.builtin import BuiltinPoseEstimator
from refany3d.models.pose.coarse import VISIBLE_CELLS, fibonacci_sphere, rank_score
from refany3d.models.pose.model import PoseModel, Similarity
from refany3d.models.pose.observe import observe
from refany3d.models.pose.refine import _Casts
from refany3d.stages.dag import STAGES
from refany3d.testing.pose_sets import primitive_cases

# Fewer rotation hypotheses than the defaults: agreement holds for any settings, and the torch
# path on two CPU cores is slow.
QUICK = PoseSettings(view_directions=14, in_plane_steps=4, icp_keep=12)
# How far the paths' poses may lie apart: ADD-S between the two posed surfaces, of the diameter.
AGREEMENT = 0.002
MARGIN_AGREEMENT = 0.02  # PoseResult.margin, in [-1, 1]


@pytest.fixture(scope="module")
def cases():
    # No symmetry to hide a disagreement behind; different sizes, so that a batch pads.
    return primitive_cases(views=1, seed=0, names=("l-bracket-12cm", "hammer-30cm", "mug-like-11cm"))


def _jittered(case, model: PoseModel, rng) -> Similarity:
    turn = Rotation.from_rotvec(rng.normal(0.0, 0.05, 3)).as_matrix()
    return Similarity(
        turn @ case.pose[:3, :3], case.scale * 1.02, case.pose[:3, 3] + 0.02 * case.scale * model.radius
    )


def test_rasterised_hits_equal_open3d_ray_casting(cases):
    models = [PoseModel(c.mesh) for c in cases]
    observations = [observe(c.depth, c.mask, c.intrinsics) for c in cases]
    views = _Views(models, observations, torch.device("cpu"))  # padded to the largest of three
    rng = np.random.default_rng(0)
    poses = [_jittered(c, m, rng) for c, m in zip(cases, models, strict=True)]
    grid, band = _cast(views, _Poses.of(poses, [0, 1, 2], torch.device("cpu")))
    ranks = _rank(views, _Poses.of(poses, [0, 1, 2], torch.device("cpu")))
    for i, (model, obs, pose) in enumerate(zip(models, observations, poses, strict=True)):
        ref_grid, ref_band = _Casts(model, obs).at(pose)
        assert ref_band.hit.sum() > 500
        g, b = len(obs.grid_uv), len(obs.band_uv)
        np.testing.assert_array_equal(grid.hit[i, :g].numpy(), ref_grid.hit)
        np.testing.assert_array_equal(band.hit[i, :b].numpy(), ref_band.hit)
        np.testing.assert_allclose(grid.depth[i, :g].numpy(), ref_grid.depth, rtol=1e-5)
        np.testing.assert_allclose(grid.normals[i, :g].numpy(), ref_grid.normals, atol=1e-6)
        assert ranks[i].item() == pytest.approx(rank_score(model, obs, pose), abs=1e-6)


def test_orthographic_visible_points_equal_open3d(cases):
    models = [PoseModel(c.mesh) for c in cases]
    observations = [observe(c.depth, c.mask, c.intrinsics) for c in cases]
    views = _Views(models, observations, torch.device("cpu"))
    directions = fibonacci_sphere(6)
    points, hit = _visible(views, torch.tensor(directions))
    for i, model in enumerate(models):
        for k, d in enumerate(directions):
            ref = model.cast_orthographic(d, VISIBLE_CELLS)
            mine = points[i, k][hit[i, k]].numpy()
            assert len(mine) == len(ref) > 50
            np.testing.assert_allclose(mine, ref, atol=1e-5 * model.radius)


def test_point_mesh_distance_equals_open3d(cases):
    model = PoseModel(cases[1].mesh)
    turn = Rotation.from_rotvec([0.3, -0.5, 0.9]).as_matrix()
    points = torch.tensor(model.surface_samples(200)) @ torch.tensor(turn).T
    tri = torch.tensor(model.vertices[model.faces] - model.center)
    ours = point_mesh_distance(points, tri).mean().item()
    assert ours == pytest.approx(model.surface_distance(turn, 200), rel=1e-5)


def _apart(model: PoseModel, a, b) -> float:
    """ADD-S between two posed copies of the model's surface, of the posed diameter."""
    points = model.surface[::4]
    pa = a.scale * points @ a.pose[:3, :3].T + a.pose[:3, 3]
    pb = b.scale * points @ b.pose[:3, :3].T + b.pose[:3, 3]
    return float(cKDTree(pa).query(pb)[0].mean()) / (2.0 * a.scale * model.radius)


def test_torch_path_agrees_with_the_cpu_path_alone_and_in_a_batch(cases):
    cpu = BuiltinPoseEstimator(QUICK)
    gpu = BatchedPoseEstimator(QUICK, "cpu")
    views = [(c.mesh, c.depth, c.mask, c.intrinsics) for c in cases[1:]]
    reference = [cpu.estimate(*v) for v in views]
    # A sample without depth in the batch fails alone; the others are posed.
    no_depth = (cases[0].mesh, np.zeros_like(cases[0].depth), cases[0].mask, cases[0].intrinsics)
    batched = gpu.estimate_many([no_depth, *views])
    assert isinstance(batched[0], PoseNotFound)
    for case, ref, got in zip(cases[1:], reference, batched[1:], strict=True):
        model = PoseModel(case.mesh)
        assert _apart(model, ref, got) < AGREEMENT, case.name
        assert got.scale == pytest.approx(ref.scale, rel=AGREEMENT)
        assert got.score == pytest.approx(ref.score, abs=1e-3)
        # the margin is a mean over the few pixels two answers dispute: the paths' poses, equal
        # to AGREEMENT, move it by a few thousandths (the verify threshold is 0.25)
        assert got.margin == pytest.approx(ref.margin, abs=MARGIN_AGREEMENT)
    # Padding to the batch's largest mesh and crop changes nothing of a sample's own answer.
    alone = gpu.estimate(*views[1])
    np.testing.assert_allclose(alone.pose, batched[2].pose, atol=1e-9)
    assert alone.scale == pytest.approx(batched[2].scale, rel=1e-9)


def test_runtime_device_cuda_chooses_the_gpu_path_and_keys_the_stage_on_it():
    on_cuda = override(BuildSettings(), **{"runtime.device": "cuda"})
    assert isinstance(load_pose_estimator(on_cuda), BatchedPoseEstimator)
    assert isinstance(load_pose_estimator(BuildSettings()), BuiltinPoseEstimator)
    assert STAGES["pose"].on_device(on_cuda) and not STAGES["pose"].on_device(BuildSettings())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU path on a GPU needs CUDA")
def test_cuda_path_agrees_with_the_cpu_path(cases):
    cpu = BuiltinPoseEstimator(QUICK)
    gpu = BatchedPoseEstimator(QUICK, "cuda")
    views = [(c.mesh, c.depth, c.mask, c.intrinsics) for c in cases]
    for case, ref, got in zip(
        cases, [cpu.estimate(*v) for v in views], gpu.estimate_many(views), strict=True
    ):
        assert _apart(PoseModel(case.mesh), ref, got) < AGREEMENT, case.name
        assert got.margin == pytest.approx(ref.margin, abs=MARGIN_AGREEMENT)


def test_a_front_pose_hint_finds_the_basin_a_blind_search_misses_on_both_paths():
    """One rotation hypothesis: on a brick (near-symmetric) it lands in a wrong basin; with the
    mesher's view of the object (the answer's rotation off by 8°) in the mesh's metadata, both
    paths start there too and find the answer."""
    cases = primitive_cases(views=3, seed=0, names=("brick-21cm",))
    from refany3d.models.pose.coarse import FRONT_POSE
    from refany3d.testing.pose_cases import pose_errors
    from refany3d.testing.pose_sets import passes

    blind = PoseSettings(view_directions=1, in_plane_steps=1, icp_keep=1, refine_candidates=1)
    off = Rotation.from_rotvec(np.radians(8.0) * np.array([0.6, 0.8, 0.0])).as_matrix()
    missed = []
    for case in cases:
        view = (case.depth, case.mask, case.intrinsics)
        alone = BuiltinPoseEstimator(blind).estimate(case.mesh, *view)
        if not passes(pose_errors(case, alone.pose, alone.scale)):
            missed.append((case, view))
    assert missed, "the blind search found every answer: nothing to show"
    for case, view in missed[:1]:
        hinted = case.mesh.copy()
        front = np.eye(4)
        front[:3, :3] = off @ case.pose[:3, :3]
        hinted.metadata[FRONT_POSE] = front
        for found in (
            BuiltinPoseEstimator(blind).estimate(hinted, *view),
            BatchedPoseEstimator(blind, "cpu").estimate_many([(hinted, *view)])[0],
        ):
            errors = pose_errors(case, found.pose, found.scale)
            assert passes(errors), (case.name, errors)
