import io

import numpy as np
import pytest

from refany3d.models.depth import DepthMap
from refany3d.records import DEPTH
from refany3d.stages import depth as depth_module
from refany3d.stages.context import StageContext
from refany3d.stages.depth import INVALID_DEPTH, depth
from refany3d.stages.detect import detect
from refany3d.stages.segment import segment
from refany3d.storage.store import ArtifactStore
from refany3d.testing.views import drawn_views, perception_settings, synthetic_views


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    views, ctx, settings = synthetic_views(tmp_path_factory.mktemp("depth"))
    return segment(detect(views, settings, ctx).kept, settings, ctx).kept, ctx, settings


def test_depth_truth_backend_stores_float16_npz_and_focal(segmented):
    from refany3d.synthetic import read_truth

    views, ctx, settings = segmented
    result = depth(views, settings, ctx)
    assert len(result.kept) == len(views) and not result.dropped
    for s in result.kept:
        d = np.load(io.BytesIO(ctx.store.get(s.artifacts[DEPTH])))["depth"]
        truth = read_truth(s.source_ref, s.side)
        assert d.dtype == np.float16 and d.shape == truth.depth.shape
        # like a depth network's, the whole frame has depth: a backdrop behind the object
        assert np.all(d > 0) and np.median(d[truth.depth == 0]) > np.median(d[truth.depth > 0])
        assert s.metrics["depth_median_m"] > 0
        assert s.focal_px == pytest.approx(truth.intrinsics[0, 0], rel=0.3)
        assert s.backends["depth"] == "truth"
        k = np.array(s.intrinsics).reshape(3, 3)
        assert k[0, 0] == k[1, 1] == s.focal_px and k[0, 2] == (d.shape[1] - 1) / 2
    again = depth(views, settings, ctx)
    assert [s.artifacts[DEPTH] for s in again.kept] == [s.artifacts[DEPTH] for s in result.kept]


class _ZeroDepth:
    name = "stub"

    def estimate(self, images, samples, options, seed):
        return [DepthMap(np.zeros((im.height, im.width), np.float32), 500.0) for im in images]


def test_depth_without_valid_values_drops_invalid_depth(monkeypatch, tmp_path):
    ctx = StageContext(store=ArtifactStore(str(tmp_path)), seed=0)
    monkeypatch.setattr(depth_module, "load_depth", lambda settings: _ZeroDepth())
    result = depth(drawn_views(ctx.store, 2), perception_settings(), ctx)
    assert [r.reason for r in result.dropped] == ["invalid_depth"] * 2 and INVALID_DEPTH == "invalid_depth"
