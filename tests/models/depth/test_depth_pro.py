import io

import numpy as np
import pytest

from refany3d.models.depth import DepthProEstimator, load_depth
from refany3d.records import DEPTH
from refany3d.stages.context import StageContext
from refany3d.stages.depth import depth
from refany3d.storage.store import ArtifactStore
from refany3d.testing.checkpoints import tiny_depth_pro
from refany3d.testing.views import drawn_views, perception_settings, run_batched


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
        # compared as the network's output, inverse depth: with random weights some pixels' inverse
        # is near 0, where depth magnifies the batch-dependent float rounding of the convolutions
        inv_a, inv_b = 1 / _load(ctx, a).astype(np.float32), 1 / _load(ctx, b).astype(np.float32)
        np.testing.assert_allclose(inv_a, inv_b, rtol=1e-2, atol=1e-3 * np.abs(inv_b).max())


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


@pytest.mark.parametrize(("side", "patch", "overlap"), [(96, 24, 0.25), (48, 24, 0.5), (24, 24, 0.0)])
def test_split_to_patches_equals_transformers_unfold(side, patch, overlap):
    import torch

    from refany3d.models.depth.depth_pro import split_to_patches

    x = torch.randn(2, 3, side, side)
    ours = split_to_patches(x, patch, overlap)
    stride = int(patch * (1 - overlap))
    ref = torch.nn.functional.unfold(x, kernel_size=patch, stride=stride).permute(2, 0, 1)
    ref = ref.reshape(-1, 3, patch, patch) if side != patch else x
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_estimate_matches_the_transformers_processor_path(setup):
    """Our batched device-side pre/post-processing gives what DepthProImageProcessor + the model give."""
    import torch
    from transformers import DepthProImageProcessor

    from refany3d.stages._views import read_views

    settings, ctx, views = setup
    est = DepthProEstimator(settings.depth.weights)
    images = read_views(ctx.store, views[:3])
    processor = DepthProImageProcessor.from_pretrained(settings.depth.weights)
    with torch.inference_mode():
        outputs = est.model(**processor(images=images, return_tensors="pt"))
    ref = processor.post_process_depth_estimation(
        outputs, target_sizes=[(im.height, im.width) for im in images]
    )
    ours = est.estimate(images, views[:3], settings.depth, 0)
    for a, r in zip(ours, ref, strict=True):
        # compared as inverse depth (what the network predicts): far pixels amplify float noise
        inverse = 1 / r["predicted_depth"].numpy()
        np.testing.assert_allclose(1 / a.depth, inverse, rtol=1e-3, atol=1e-5 * inverse.max())
        assert a.focal_px == pytest.approx(float(r["focal_length"]), rel=1e-5)


def test_strided_patch_encoder_equals_stock_model_and_leaves_transformers_alone(setup):
    """The backend's patch encoder (patches cut as strided views) is this instance's own:
    transformers' `split_to_patches` stays the library's, a model loaded beside it keeps the stock
    encoder, and both give the same outputs."""
    import torch
    from transformers import DepthProForDepthEstimation
    from transformers.models.depth_pro import modeling_depth_pro
    from transformers.models.depth_pro.modeling_depth_pro import DepthProPatchEncoder

    from refany3d.models.depth.depth_pro import split_to_patches

    settings, _, _ = setup
    est = DepthProEstimator(settings.depth.weights)
    assert modeling_depth_pro.split_to_patches is not split_to_patches
    encoders = [m for m in est.model.modules() if isinstance(m, DepthProPatchEncoder)]
    assert encoders and all(type(m).__name__ == "_StridedPatchEncoder" for m in encoders)
    stock = DepthProForDepthEstimation.from_pretrained(settings.depth.weights).eval()
    assert {type(m) for m in stock.modules() if isinstance(m, DepthProPatchEncoder)} == {DepthProPatchEncoder}
    size = est.input_size[0]  # the processor's: the size the encoder's scales and patches fit
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, ref = est.model(pixel_values=pixels), stock(pixel_values=pixels)
    torch.testing.assert_close(ours.predicted_depth, ref.predicted_depth, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.field_of_view, ref.field_of_view, rtol=1e-4, atol=1e-5)


def test_adapt_patch_encoder_skips_unchecked_transformers(setup, monkeypatch):
    import transformers
    from transformers import DepthProForDepthEstimation

    from refany3d.models.depth.depth_pro import adapt_patch_encoder

    settings, _, _ = setup
    model = DepthProForDepthEstimation.from_pretrained(settings.depth.weights)
    monkeypatch.setattr(transformers, "__version__", "6.0.0")
    assert adapt_patch_encoder(model) == 0
    monkeypatch.undo()
    assert adapt_patch_encoder(model) > 0
