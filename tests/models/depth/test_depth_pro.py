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


def test_estimate_compiled_layers_equal_plain(setup):
    """The `depth.compile` fast path (compiled DINOv2/fusion/head layers) gives the plain results;
    aot_eager traces the layers as inductor would, without its minutes of CPU code generation."""
    from refany3d.models._torch import compile_layers
    from refany3d.stages._views import read_views

    settings, ctx, views = setup
    est = DepthProEstimator(settings.depth.weights)
    images = read_views(ctx.store, views[:3])
    plain = est.estimate(images, views[:3], settings.depth, 0)
    assert (
        compile_layers(est.model, est.compile_layers, backend="aot_eager") == 11
    )  # 3 × 2 DINOv2 layers, 4 fusion, head
    fast = est.estimate(images, views[:3], settings.depth, 0)
    for a, b in zip(plain, fast, strict=True):
        np.testing.assert_allclose(a.depth, b.depth, rtol=1e-4, atol=1e-4)
        assert a.focal_px == pytest.approx(b.focal_px, rel=1e-5)
