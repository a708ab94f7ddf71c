import io

import numpy as np
import pytest

from refany3d.models.depth import DepthProEstimator, load_depth
from refany3d.records import DEPTH
from refany3d.stages.context import StageContext
from refany3d.stages.depth import depth
from refany3d.storage.store import ArtifactStore
from tests.models._views import drawn_views, perception_settings, run_batched, tiny_depth_pro


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth_pro")
    weights = tiny_depth_pro(root / "model")
    settings = perception_settings(**{"depth.backend": "depth-pro", "depth.weights": str(weights)})
    ctx = StageContext(store=ArtifactStore(str(root / "artifacts")), seed=0)
    return settings, ctx, drawn_views(ctx.store, 5)


def _load(ctx, sample):
    return np.load(io.BytesIO(ctx.store.get(sample.artifacts[DEPTH])))["depth"]


def test_depth_stage_depth_pro_stores_float16_metric_depth_and_focal(setup):
    settings, ctx, views = setup
    assert isinstance(load_depth(settings), DepthProEstimator)
    result = depth(views, settings, ctx)
    assert len(result.kept) == 5
    for s in result.kept:
        d = _load(ctx, s)
        assert d.dtype == np.float16 and d.shape == (96, 96) and np.all(np.isfinite(d)) and d.max() > 0
        assert s.focal_px > 0 and 0 < s.metrics["fov_deg"] < 180 and s.backends["depth"] == "depth-pro"


def test_depth_depth_pro_batch_of_one_equals_batch_of_five(setup):
    settings, ctx, views = setup
    one = run_batched(depth, views, settings, ctx, "depth", 1)
    five = run_batched(depth, views, settings, ctx, "depth", 5)
    np.testing.assert_allclose([s.focal_px for s in one.kept], [s.focal_px for s in five.kept], rtol=1e-4)
    for a, b in zip(one.kept, five.kept, strict=True):
        np.testing.assert_allclose(
            _load(ctx, a).astype(np.float32), _load(ctx, b).astype(np.float32), rtol=1e-2
        )
