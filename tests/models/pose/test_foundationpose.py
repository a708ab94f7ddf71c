import importlib.util

import pytest

from refany3d.config import PoseSettings, SettingsError
from refany3d.models.pose import load_pose_estimator


@pytest.mark.skipif(importlib.util.find_spec("estimater") is not None, reason="FoundationPose is installed")
def test_load_pose_estimator_foundationpose_without_its_code_names_the_setting():
    with pytest.raises(SettingsError, match=r"^pose\.backend: 'foundationpose' needs NVlabs FoundationPose"):
        load_pose_estimator(PoseSettings(backend="foundationpose"))


def test_load_pose_estimator_foundationpose_missing_weights_dir_names_the_setting(tmp_path):
    with pytest.raises(SettingsError, match=r"^pose\.weights: .* is not a directory"):
        load_pose_estimator(PoseSettings(backend="foundationpose", weights=str(tmp_path / "absent")))


def test_importing_the_package_does_not_need_foundationpose():
    import refany3d.models.pose.foundationpose as adapter
    import refany3d.stages.pose  # noqa: F401

    assert adapter.FoundationPoseEstimator.name == "foundationpose"


def test_foundationpose_adapter_registers_the_calibrated_metric_mesh(monkeypatch):
    """FoundationPose's API stood in for (it is CUDA-only): the adapter hands it the mesh scaled
    by our calibration and returns its pose with that scale."""
    import sys
    import types

    import numpy as np

    from refany3d.testing.pose_sets import primitive_cases

    case = primitive_cases(views=1, seed=4)[5]
    seen = {}

    class FakeFoundationPose:
        def __init__(self, model_pts, model_normals, mesh, scorer, refiner, glctx):
            seen["extent"] = float(np.ptp(mesh.vertices, axis=0).max())

        def register(self, K, rgb, depth, ob_mask, iteration):
            seen["iteration"] = iteration
            return case.pose

    estimater = types.SimpleNamespace(
        FoundationPose=FakeFoundationPose, ScorePredictor=lambda: None, PoseRefinePredictor=lambda: None
    )
    nvdiffrast = types.ModuleType("nvdiffrast")
    nvdiffrast.torch = types.SimpleNamespace(RasterizeCudaContext=lambda: None)
    monkeypatch.setitem(sys.modules, "estimater", estimater)
    monkeypatch.setitem(sys.modules, "nvdiffrast", nvdiffrast)
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", nvdiffrast.torch)
    from refany3d.models.pose.foundationpose import FoundationPoseEstimator

    rgb = np.zeros(case.mask.shape + (3,), np.uint8)
    result = FoundationPoseEstimator(PoseSettings(backend="foundationpose")).estimate(
        case.mesh, case.depth, case.mask, case.intrinsics, rgb
    )
    assert np.array_equal(result.pose, case.pose) and seen["iteration"] == 5
    assert result.scale == pytest.approx(case.scale, rel=0.03)
    assert seen["extent"] == pytest.approx(2.0 * result.scale, rel=1e-6)  # canonical extent 2 → metres
    assert result.score > 0.5
