import numpy as np
import pytest

from refany3d.config import override
from refany3d.models.depth import TruthDepthEstimator
from refany3d.testing.views import synthetic_views


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthetic_views(tmp_path_factory.mktemp("truth_depth"))


def test_truth_depth_errs_like_a_depth_network(synthetic):
    """The whole frame has depth (a backdrop behind the object), smeared across the silhouette;
    deep inside the object one global scale error and small noise."""
    import cv2

    from refany3d.synthetic import read_truth

    views, _, settings = synthetic
    opts = override(settings, **{"depth.truth_scale_error": 0.2, "depth.truth_noise": 0.01}).depth
    out = TruthDepthEstimator().estimate([None] * len(views), views, opts, 0)
    for sample, dm in zip(views, out, strict=True):
        truth = read_truth(sample.source_ref, sample.side)
        valid = truth.depth > 0
        assert np.all(dm.depth > 0)  # a backdrop, not 0 off the object
        assert np.median(dm.depth[~valid]) > np.median(dm.depth[valid])  # behind the object
        deep = cv2.erode(valid.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        ratio = dm.depth[deep] / truth.depth[deep]
        assert np.std(ratio) / np.mean(ratio) < 0.04  # one scale for the view, ~1% noise
        edge = valid & ~deep
        assert np.mean(dm.depth[edge] / truth.depth[edge]) > np.mean(ratio)  # flying pixels: pulled back
        assert dm.focal_px > 0 and abs(np.log(dm.focal_px / truth.intrinsics[0, 0])) < 0.3


def test_truth_depth_without_errors_equals_ground_truth(synthetic):
    from refany3d.synthetic import read_truth

    views, _, settings = synthetic
    no_errors = {
        "depth.truth_scale_error": 0.0,
        "depth.truth_noise": 0.0,
        "depth.truth_focal_error": 0.0,
        "depth.truth_low_frequency": 0.0,
        "depth.truth_flying_px": 0,
        "depth.truth_backdrop_min": 0.0,
    }
    opts = override(settings, **no_errors).depth
    dm = TruthDepthEstimator().estimate([None], views[:1], opts, 0)[0]
    truth = read_truth(views[0].source_ref, views[0].side)
    np.testing.assert_allclose(dm.depth, truth.depth, rtol=1e-6)
    assert dm.focal_px == pytest.approx(truth.intrinsics[0, 0])


def test_truth_backends_refuse_non_synthetic_rows(synthetic):
    views, _, settings = synthetic
    other = views[0].replace(source="subjects200k")
    with pytest.raises(ValueError, match="need synthetic rows"):
        TruthDepthEstimator().estimate([None], [other], settings.depth, 0)
