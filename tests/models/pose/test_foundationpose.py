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
