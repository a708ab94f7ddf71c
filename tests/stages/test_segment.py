import io

import numpy as np
import pytest
from PIL import Image

from refany3d.config import override
from refany3d.models.segmenter import Segmentation
from refany3d.records import MASK
from refany3d.stages import segment as segment_module
from refany3d.stages.context import StageContext
from refany3d.stages.detect import detect
from refany3d.stages.segment import MASK_FRAGMENTED, MASK_TOO_LARGE, MASK_TOO_SMALL, MISSING_BOX, segment
from refany3d.storage.store import ArtifactStore
from refany3d.testing.views import drawn_views, perception_settings, synthetic_views


@pytest.fixture(scope="module")
def detected(tmp_path_factory):
    views, ctx, settings = synthetic_views(tmp_path_factory.mktemp("seg"))
    return detect(views, settings, ctx).kept, ctx, settings


def test_segment_truth_backend_stores_8bit_masks(detected):
    views, ctx, settings = detected
    result = segment(views, settings, ctx)
    assert len(result.kept) == len(views) and not result.dropped
    for s in result.kept:
        mask = np.asarray(Image.open(io.BytesIO(ctx.store.get(s.artifacts[MASK]))))
        assert mask.dtype == np.uint8 and mask.shape == (96, 96) and set(np.unique(mask)) == {0, 255}
        assert s.metrics["mask_area_ratio"] == pytest.approx((mask > 0).mean())
        assert s.backends["segment"] == "truth"


def test_segment_mask_above_max_area_ratio_drops_mask_too_large(detected):
    views, ctx, settings = detected
    strict = override(settings, **{"segmenter.max_area_ratio": 0.002, "segmenter.min_area_ratio": 0.0})
    result = segment(views, strict, ctx)
    assert not result.kept
    assert {r.reason for r in result.dropped} == {"mask_too_large"} == {MASK_TOO_LARGE}
    assert all(r.metric > 0.002 for r in result.dropped)


def test_segment_mask_below_min_area_ratio_drops_mask_too_small(detected):
    views, ctx, settings = detected
    strict = override(settings, **{"segmenter.max_area_ratio": 1.0, "segmenter.min_area_ratio": 0.9})
    result = segment(views, strict, ctx)
    assert {r.reason for r in result.dropped} == {"mask_too_small"} == {MASK_TOO_SMALL}


class _StubSegmenter:
    name = "stub"

    def __init__(self, mask):
        self.mask = mask

    def segment(self, images, boxes, samples, options, seed):
        return [Segmentation(self.mask, 0.9) for _ in images]


def _blobs(n, size=96):
    mask = np.zeros((size, size), bool)
    for i in range(n):
        mask[10 + 20 * i : 25 + 20 * i, 10:40] = True
    return mask


@pytest.mark.parametrize(("blobs", "kept"), [(2, True), (3, False)])
def test_segment_more_parts_than_max_components_drops_mask_fragmented(monkeypatch, tmp_path, blobs, kept):
    ctx = StageContext(store=ArtifactStore(str(tmp_path)), seed=0)
    views = [v.replace(box=[0.0, 0.0, 96.0, 96.0]) for v in drawn_views(ctx.store, 1)]
    mask = _blobs(blobs)
    mask[80, 80] = True  # a speck below min_component_ratio is not a part
    monkeypatch.setattr(segment_module, "load_segmenter", lambda settings: _StubSegmenter(mask))
    result = segment(views, perception_settings(**{"segmenter.max_components": 2}), ctx)
    if kept:
        assert result.kept[0].metrics["mask_components"] == 2.0
    else:
        (rej,) = result.dropped
        assert (rej.reason, rej.metric) == ("mask_fragmented", 3.0) and rej.reason == MASK_FRAGMENTED


def test_segment_sample_without_box_drops_missing_box(tmp_path):
    ctx = StageContext(store=ArtifactStore(str(tmp_path)), seed=0)
    result = segment(drawn_views(ctx.store, 1), perception_settings(), ctx)
    assert [r.reason for r in result.dropped] == ["missing_box"] == [MISSING_BOX]
