import numpy as np
import pytest

from refany3d.models.segmenter import TruthSegmenter
from refany3d.testing.views import synthetic_views


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthetic_views(tmp_path_factory.mktemp("truth_seg"))


def test_truth_segmenter_mask_overlaps_ground_truth(synthetic):
    from refany3d.synthetic import read_truth

    views, _, settings = synthetic
    out = TruthSegmenter().segment(
        [None] * len(views), [[0, 0, 1, 1]] * len(views), views, settings.segmenter, 0
    )
    for sample, seg in zip(views, out, strict=True):
        true = read_truth(sample.source_ref, sample.side).mask
        assert seg.mask.shape == true.shape and seg.mask.dtype == bool
        assert (seg.mask & true).sum() / (seg.mask | true).sum() > 0.6
        assert (seg.mask ^ true).any()  # a segmenter's errors (each mode: tests/test_perception_errors.py)


def test_truth_segmenter_without_errors_returns_the_true_mask(synthetic):
    from refany3d.config import override
    from refany3d.synthetic import read_truth

    views, _, settings = synthetic
    fields = ("wobble_px", "bias_px", "ragged_px", "bleed_px")
    opts = override(settings, **{f"segmenter.truth_{f}": 0.0 for f in fields}).segmenter
    seg = TruthSegmenter().segment([None], [[0, 0, 1, 1]], views[:1], opts, 0)[0]
    assert np.array_equal(seg.mask, read_truth(views[0].source_ref, views[0].side).mask)
