import numpy as np
import pytest

from refany3d.models.detector import TruthDetector, load_detector
from refany3d.models.detector.truth import perturb_box
from refany3d.stages._views import read_view
from refany3d.testing.views import synthetic_views


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthetic_views(tmp_path_factory.mktemp("truth_det"))


def _box_of(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


def test_truth_detector_box_is_close_to_the_true_mask_box(synthetic):
    from refany3d.synthetic import read_truth

    views, ctx, settings = synthetic
    det = load_detector(settings)
    assert isinstance(det, TruthDetector)
    images = [read_view(ctx.store, s) for s in views]
    out = det.detect(images, ["x."] * len(views), views, settings.detector, 0)
    for sample, d in zip(views, out, strict=True):
        true = _box_of(read_truth(sample.source_ref, sample.side).mask)
        size = max(true[2] - true[0], true[3] - true[1])
        assert d.boxes.shape == (1, 4) and d.scores.tolist() == [1.0] and d.phrases == ["x"]
        assert np.all(np.abs(d.boxes[0] - true) < 0.5 * size)


def test_truth_detector_same_seed_same_box_other_seed_other_box(synthetic):
    views, ctx, settings = synthetic
    det = TruthDetector()
    images = [read_view(ctx.store, s) for s in views]
    a = det.detect(images, ["x."] * len(views), views, settings.detector, 0)
    b = det.detect(images, ["x."] * len(views), views, settings.detector, 0)
    c = det.detect(images, ["x."] * len(views), views, settings.detector, 1)
    assert all(np.array_equal(x.boxes, y.boxes) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x.boxes, y.boxes) for x, y in zip(a, c, strict=True))


def test_perturb_box_dilates_and_clips():
    rng = np.random.default_rng(0)
    box = perturb_box(np.array([10.0, 10.0, 50.0, 50.0]), 0.1, 0.0, (100, 100), rng)
    np.testing.assert_allclose(box, [6, 6, 54, 54])
    box = perturb_box(np.array([0.0, 0.0, 100.0, 100.0]), 0.2, 0.0, (100, 100), rng)
    np.testing.assert_allclose(box, [0, 0, 100, 100])
