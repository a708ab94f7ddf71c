import numpy as np
import pytest

from refany3d.models.segmenter import HfSamSegmenter, load_segmenter
from refany3d.records import MASK
from refany3d.stages._views import read_mask, read_view
from refany3d.stages.context import StageContext
from refany3d.stages.segment import segment
from refany3d.storage.store import ArtifactStore
from refany3d.testing.checkpoints import tiny_hf_sam
from refany3d.testing.views import drawn_views, perception_settings, run_batched


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_sam")
    weights = tiny_hf_sam(root / "model")
    settings = perception_settings(
        **{
            "segmenter.backend": "hf-sam",
            "segmenter.weights": str(weights),
            "segmenter.max_area_ratio": 1.0,
            "segmenter.min_area_ratio": 0.0,
            "segmenter.max_components": 10000,
        }
    )
    ctx = StageContext(store=ArtifactStore(str(root / "artifacts")), seed=0)
    views = drawn_views(ctx.store, 5)
    for i, s in enumerate(views):
        s.box = [10.0 + i, 12.0, 70.0, 80.0 - i]
    return settings, ctx, views


def test_segment_hf_sam_returns_bool_masks_of_view_size(setup):
    settings, ctx, views = setup
    seg = load_segmenter(settings)
    assert isinstance(seg, HfSamSegmenter)
    out = seg.segment(
        [read_view(ctx.store, s) for s in views[:2]],
        [s.box for s in views[:2]],
        views[:2],
        settings.segmenter,
        0,
    )
    assert [o.mask.shape for o in out] == [(96, 96)] * 2 and all(o.mask.dtype == bool for o in out)


def test_segment_stage_hf_sam_stores_masks(setup):
    settings, ctx, views = setup
    result = segment(views, settings, ctx)
    assert len(result.kept) == 5
    for s in result.kept:
        assert np.asarray(read_mask(ctx.store, s.artifacts[MASK])).shape == (96, 96)
        assert s.backends["segment"] == "hf-sam"


def test_segment_hf_sam_batch_of_one_equals_batch_of_five(setup):
    settings, ctx, views = setup
    one = run_batched(segment, views, settings, ctx, "segmenter", 1)
    five = run_batched(segment, views, settings, ctx, "segmenter", 5)
    assert [s.artifacts[MASK] for s in one.kept] == [s.artifacts[MASK] for s in five.kept]
