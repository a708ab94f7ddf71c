import numpy as np
import pytest

from refany3d.config import override
from refany3d.models.depth import TruthDepthEstimator
from tests.models._views import synthetic_views


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthetic_views(tmp_path_factory.mktemp("truth_depth"))


def test_truth_depth_has_one_global_scale_error_and_small_noise(synthetic):
    from refany3d.synthetic import read_truth

    views, _, settings = synthetic
    opts = override(settings, **{"depth.truth_scale_error": 0.2, "depth.truth_noise": 0.01}).depth
    out = TruthDepthEstimator().estimate([None] * len(views), views, opts, 0)
    for sample, dm in zip(views, out, strict=True):
        truth = read_truth(sample.source_ref, sample.side)
        valid = truth.depth > 0
        ratio = dm.depth[valid] / truth.depth[valid]
        assert np.all(dm.depth[~valid] == 0)
        assert np.std(ratio) / np.mean(ratio) < 0.03  # one scale for the view, ~1% noise
        assert dm.focal_px > 0 and abs(np.log(dm.focal_px / truth.intrinsics[0, 0])) < 0.3


def test_truth_depth_without_errors_equals_ground_truth(synthetic):
    from refany3d.synthetic import read_truth

    views, _, settings = synthetic
    opts = override(
        settings, **{"depth.truth_scale_error": 0.0, "depth.truth_noise": 0.0, "depth.truth_focal_error": 0.0}
    ).depth
    dm = TruthDepthEstimator().estimate([None], views[:1], opts, 0)[0]
    truth = read_truth(views[0].source_ref, views[0].side)
    np.testing.assert_allclose(dm.depth, truth.depth, rtol=1e-6)
    assert dm.focal_px == pytest.approx(truth.intrinsics[0, 0])


def test_truth_backends_refuse_non_synthetic_rows(synthetic):
    views, _, settings = synthetic
    other = views[0].replace(source="subjects200k")
    with pytest.raises(ValueError, match="need synthetic rows"):
        TruthDepthEstimator().estimate([None], [other], settings.depth, 0)
