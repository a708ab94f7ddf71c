import numpy as np
import pytest

from refany3d.models.segmenter import TruthSegmenter
from refany3d.models.segmenter.truth import noisy_boundary
from tests.models._views import synthetic_views


def _disc(size=96, r=25):
    yy, xx = np.mgrid[:size, :size]
    return (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r


def test_noisy_boundary_moves_only_near_the_edge():
    mask = _disc()
    noisy = noisy_boundary(mask, 2, np.random.default_rng(0))
    changed = noisy ^ mask
    assert changed.any()
    yy, xx = np.nonzero(changed)
    radius = np.hypot(yy - 48, xx - 48)
    assert np.all(np.abs(radius - 25) < 4)
    iou = (noisy & mask).sum() / (noisy | mask).sum()
    assert 0.85 < iou < 1.0


def test_noisy_boundary_radius_zero_is_identity():
    mask = _disc()
    assert np.array_equal(noisy_boundary(mask, 0, np.random.default_rng(0)), mask)


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
