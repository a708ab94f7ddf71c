import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from refany3d.config import BuildSettings
from refany3d.models.pose import PoseNotFound, PoseResult
from refany3d.records import DEPTH, MASK, MESH, Sample
from refany3d.render.mesh import mesh_to_glb
from refany3d.stages import pose as pose_module
from refany3d.stages.context import StageContext
from refany3d.stages.pose import MISSING_INPUT, POSE_FAILED, estimate_pose, pose
from refany3d.storage.store import ArtifactStore
from refany3d.testing.pose_cases import pose_errors
from refany3d.testing.pose_sets import primitive_cases


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _npz(depth: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, depth=depth.astype(np.float16))  # as the depth stage stores it
    return buf.getvalue()


def _sample(ctx: StageContext, case, index: int, depth: np.ndarray | None = None) -> Sample:
    sample = Sample(f"s{index}", f"row{index}", "synthetic", f"x#{index}", side="left")
    sample.artifacts[MESH] = ctx.store.put_content("mesh", mesh_to_glb(case.mesh), ".glb")
    sample.artifacts[DEPTH] = ctx.store.put_content(
        "depth", _npz(case.depth if depth is None else depth), ".npz"
    )
    sample.artifacts[MASK] = ctx.store.put_content("mask", _png(case.mask), ".png")
    sample.intrinsics = [float(v) for v in case.intrinsics.ravel()]
    return sample


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    ctx = StageContext(store=ArtifactStore(str(tmp_path_factory.mktemp("pose"))), seed=0)
    cases = primitive_cases(views=1, seed=2)[1:3]
    return ctx, cases, [_sample(ctx, c, i) for i, c in enumerate(cases)]


def test_pose_writes_pose_scale_metrics_and_backend(staged):
    ctx, cases, samples = staged
    result = pose(samples, BuildSettings(), ctx)
    assert not result.dropped and len(result.kept) == len(samples)
    for case, s in zip(cases, result.kept, strict=True):
        matrix = np.array(s.pose).reshape(4, 4)
        errors = pose_errors(case, matrix, s.mesh_scale)
        assert errors.add_s < 0.05 and errors.scale < 0.06  # plumbing: accuracy is tested in models/pose
        assert np.allclose(matrix[3], [0, 0, 0, 1]) and np.allclose(
            matrix[:3, :3] @ matrix[:3, :3].T, np.eye(3)
        )
        assert 0.5 < s.metrics["pose_score"] <= 1.0
        assert 0.0 <= s.metrics["depth_outlier_ratio"] < 0.5  # flying pixels at the edges count
        assert s.backends["pose"] == "builtin"
    again = pose(samples, BuildSettings(), ctx)
    assert [(s.pose, s.mesh_scale, s.metrics) for s in again.kept] == [
        (s.pose, s.mesh_scale, s.metrics) for s in result.kept
    ]


def test_pose_without_depth_in_the_mask_drops_pose_failed(staged):
    ctx, cases, _ = staged
    empty = _sample(ctx, cases[0], 9, depth=np.zeros_like(cases[0].depth))
    result = pose([empty], BuildSettings(), ctx)
    assert not result.kept
    assert [r.reason for r in result.dropped] == ["pose_failed"] == [POSE_FAILED]
    assert result.dropped[0].stage == "pose" and "PoseNotFound" in result.dropped[0].detail


class _Raising:
    name, needs_rgb = "stub", False

    def estimate(self, mesh, depth, mask, intrinsics, rgb=None):
        raise RuntimeError("solver blew up")


class _NonFinite:
    name, needs_rgb = "stub", False

    def estimate(self, mesh, depth, mask, intrinsics, rgb=None):
        return PoseResult(np.full((4, 4), np.nan), 1.0, 1.0)


@pytest.mark.parametrize("estimator", [_Raising(), _NonFinite()])
def test_pose_estimator_raising_or_nonfinite_drops_pose_failed(staged, monkeypatch, estimator):
    ctx, _, samples = staged
    monkeypatch.setattr(pose_module, "load_pose_estimator", lambda settings: estimator)
    result = pose(samples, BuildSettings(), ctx)
    assert not result.kept and {r.reason for r in result.dropped} == {"pose_failed"}


def test_pose_without_mesh_or_intrinsics_drops_missing_input(staged):
    ctx, _, samples = staged
    no_mesh = samples[0].replace()
    del no_mesh.artifacts[MESH]
    no_k = samples[1].replace(intrinsics=None)
    result = pose([no_mesh, no_k], BuildSettings(), ctx)
    assert [r.reason for r in result.dropped] == ["missing_input"] * 2 == [MISSING_INPUT] * 2
    assert [r.detail for r in result.dropped] == ["mesh", "intrinsics"]


def test_estimate_pose_returns_the_contract(staged):
    _, cases, _ = staged
    case = cases[0]
    result = estimate_pose(case.mesh, case.depth, case.mask, case.intrinsics, rgb=None)
    assert isinstance(result, PoseResult) and result.pose.shape == (4, 4)
    assert isinstance(result.scale, float) and isinstance(result.score, float)
    x_cam = result.scale * case.mesh.vertices @ result.pose[:3, :3].T + result.pose[:3, 3]
    assert np.median(x_cam[:, 2]) == pytest.approx(np.median(case.depth[case.mask]), rel=0.1)


def test_estimate_pose_with_empty_mask_raises_pose_not_found(staged):
    _, cases, _ = staged
    case = cases[0]
    with pytest.raises(PoseNotFound):
        estimate_pose(case.mesh, case.depth, np.zeros_like(case.mask), case.intrinsics)


def test_pose_on_the_gpu_path_poses_the_batch_at_once_and_drops_alone(staged, monkeypatch):
    """The stage hands the GPU path (here on the CPU) the whole batch in one call; a sample
    without depth is dropped by its own reason, the others are posed as the CPU path poses them."""
    from refany3d.config import PoseSettings
    from refany3d.models.pose.batched import BatchedPoseEstimator

    ctx, cases, samples = staged
    quick = PoseSettings(view_directions=14, in_plane_steps=4, icp_keep=12)
    estimator = BatchedPoseEstimator(quick, "cpu")
    calls = []
    many = estimator.estimate_many
    monkeypatch.setattr(
        estimator, "estimate_many", lambda views, device: calls.append(len(views)) or many(views, device)
    )
    monkeypatch.setattr(pose_module, "load_pose_estimator", lambda settings: estimator)
    empty = _sample(ctx, cases[0], 9, depth=np.zeros_like(cases[0].depth))
    result = pose([empty, samples[1]], BuildSettings(), ctx)
    assert calls == [2]
    assert [r.reason for r in result.dropped] == [POSE_FAILED] and "PoseNotFound" in result.dropped[0].detail
    (kept,) = result.kept
    errors = pose_errors(cases[1], np.array(kept.pose).reshape(4, 4), kept.mesh_scale)
    assert errors.add_s < 0.05 and errors.scale < 0.06


def test_pose_on_the_gpu_path_searches_inside_a_device_turn_and_reads_outside_it(staged, monkeypatch):
    """The stage's GPU turn covers the search on the device only: reading the mesh, depth and
    mask, and making the observations, hold no turn (another batch's forward pass runs then)."""
    import contextlib

    from refany3d.config import PoseSettings
    from refany3d.models.pose import batched as batched_module

    ctx, _, samples = staged
    held, seen = [False], {"read": [], "observe": [], "search": []}

    @contextlib.contextmanager
    def device():
        held[0] = True
        yield
        held[0] = False

    def spy(name, real):
        return lambda *a, **k: seen[name].append(held[0]) or real(*a, **k)

    estimator = batched_module.BatchedPoseEstimator(PoseSettings(view_directions=14, in_plane_steps=4), "cpu")
    monkeypatch.setattr(pose_module, "load_pose_estimator", lambda settings: estimator)
    monkeypatch.setattr(pose_module, "read_depth", spy("read", pose_module.read_depth))
    monkeypatch.setattr(batched_module, "observe", spy("observe", batched_module.observe))
    monkeypatch.setattr(estimator, "_search", spy("search", estimator._search))
    result = pose(samples, BuildSettings(), dataclasses.replace(ctx, device=device))
    assert len(result.kept) == len(samples)
    assert seen == {"read": [False] * len(samples), "observe": [False] * len(samples), "search": [True]}


class _BatchFails(_Raising):
    name = "stub"

    def __init__(self):
        self.single = 0

    def estimate_many(self, views, device):
        raise MemoryError("CUDA out of memory")

    def estimate(self, mesh, depth, mask, intrinsics, rgb=None):
        self.single += 1
        return PoseResult(np.eye(4), 1.0, 1.0)


def test_pose_falls_back_to_one_sample_at_a_time_when_the_batch_fails(staged, monkeypatch):
    ctx, _, samples = staged
    estimator = _BatchFails()
    monkeypatch.setattr(pose_module, "load_pose_estimator", lambda settings: estimator)
    result = pose(samples, BuildSettings(), ctx)
    assert estimator.single == len(samples) and len(result.kept) == len(samples)


def test_pose_hands_the_mesh_stage_front_pose_to_the_estimator(staged, monkeypatch):
    """The mesher's view of the object (`Sample.front_pose`) reaches the estimator on the mesh it
    gets (the `estimate_pose` contract stays as it is)."""
    from refany3d.models.pose.coarse import FRONT_POSE

    ctx, _, samples = staged
    seen = []

    class _Recording(_Raising):
        name = "stub"

        def estimate(self, mesh, depth, mask, intrinsics, rgb=None):
            seen.append(mesh.metadata.get(FRONT_POSE))
            return PoseResult(np.eye(4), 1.0, 1.0)

    monkeypatch.setattr(pose_module, "load_pose_estimator", lambda settings: _Recording())
    front = np.eye(4)
    front[:3, :3] = np.diag([1.0, -1.0, -1.0])
    hinted = samples[0].replace(front_pose=[float(v) for v in front.ravel()])
    pose([hinted, samples[1]], BuildSettings(), ctx)
    np.testing.assert_array_equal(seen[0], front)
    assert seen[1] is None
