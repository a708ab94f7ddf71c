import numpy as np
import pytest

from refany3d.config import override
from refany3d.models.detector import HfGroundingDinoDetector, load_detector
from refany3d.stages.context import StageContext
from refany3d.stages.detect import detect
from refany3d.storage.store import ArtifactStore
from refany3d.testing.checkpoints import tiny_hf_grounding_dino
from refany3d.testing.views import drawn_views, perception_settings, run_batched


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_gdino")
    weights = tiny_hf_grounding_dino(root / "model")
    settings = perception_settings(
        **{
            "detector.backend": "hf-grounding-dino",
            "detector.weights": str(weights),
            "detector.box_threshold": 0.0,
            "detector.text_threshold": 0.0,
        }
    )
    ctx = StageContext(store=ArtifactStore(str(root / "artifacts")), seed=0)
    return settings, ctx, drawn_views(ctx.store, 5)


def test_load_detector_builds_hf_backend_once(setup):
    settings, _, _ = setup
    det = load_detector(settings)
    assert isinstance(det, HfGroundingDinoDetector)
    assert load_detector(settings) is det


def test_detect_returns_boxes_scores_phrases(setup):
    settings, ctx, views = setup
    from refany3d.stages._views import read_view

    images = [read_view(ctx.store, s) for s in views[:2]]
    dets = load_detector(settings).detect(
        images, ["red mug.", "wooden chair."], views[:2], settings.detector, 0
    )
    assert len(dets) == 2
    for d in dets:
        assert (
            d.boxes.dtype == np.float32
            and d.boxes.shape == (len(d.scores), 4)
            and len(d.phrases) == len(d.scores)
        )
        assert len(d.scores) > 0 and np.all((d.scores >= 0) & (d.scores <= 1))


def test_detect_stage_keeps_boxes_inside_view(setup):
    settings, ctx, views = setup
    result = detect(views, settings, ctx)
    assert len(result.kept) + len(result.dropped) == 5 and result.kept
    for s in result.kept:
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
        assert 0 <= s.metrics["box_score"] <= 1 and s.backends["detect"] == "hf-grounding-dino"


def test_detect_batch_of_one_equals_batch_of_five(setup):
    settings, ctx, views = setup
    one = run_batched(detect, views, settings, ctx, "detector", 1)
    five = run_batched(detect, views, settings, ctx, "detector", 5)
    assert [s.sample_id for s in one.kept] == [s.sample_id for s in five.kept]
    np.testing.assert_allclose([s.box for s in one.kept], [s.box for s in five.kept], atol=1e-3)


def test_detect_prompts_padded_to_a_multiple_of_16_tokens_give_the_unpadded_results(setup):
    """Padding prompts (few text lengths, so few CUDA graphs) changes nothing: padded tokens are
    masked in the text encoder, the fusion layers, the decoder and the logits."""
    from refany3d.stages._views import read_views

    settings, ctx, views = setup
    det = HfGroundingDinoDetector(settings.detector.weights)
    assert det.text_pad_multiple == 16
    images, prompts = read_views(ctx.store, views[:2]), ["red mug.", "a wooden chair."]
    padded = det.detect(images, prompts, views[:2], settings.detector, 0)
    det.text_pad_multiple = 1
    plain = det.detect(images, prompts, views[:2], settings.detector, 0)
    for a, b in zip(plain, padded, strict=True):
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        assert a.phrases == b.phrases


@pytest.mark.slow  # ~2 min of dynamo tracing on 2 cores; `detector.compile` is off by default
def test_detect_compiled_layers_equal_plain(setup):
    """The `detector.compile` fast path (compiled Swin/BERT/encoder/decoder layers) gives the plain boxes."""
    from refany3d.models._torch import compile_layers
    from refany3d.stages._views import read_views

    settings, ctx, views = setup
    det = HfGroundingDinoDetector(settings.detector.weights)
    images, prompts = read_views(ctx.store, views[:2]), ["red mug.", "wooden chair."]
    plain = det.detect(images, prompts, views[:2], settings.detector, 0)
    assert compile_layers(det.model, det.compile_layers, backend="aot_eager") > 0
    fast = det.detect(images, prompts, views[:2], settings.detector, 0)
    for a, b in zip(plain, fast, strict=True):
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        assert a.phrases == b.phrases


def test_summed_deformable_attention_equals_transformers_core():
    import torch
    from transformers.models.grounding_dino.modeling_grounding_dino import MultiScaleDeformableAttention

    from refany3d.models.detector.hf_grounding_dino import _summed_deformable_attention_class

    torch.manual_seed(0)
    shapes = [(12, 10), (6, 5), (3, 3), (2, 1)]
    batch, heads, dim, queries, points = 2, 4, 8, 7, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, dim)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2) * 1.2 - 0.1  # some outside
    weights = torch.softmax(torch.randn(batch, queries, heads, len(shapes) * points), -1)
    weights = weights.view(batch, queries, heads, len(shapes), points)
    spatial = torch.tensor(shapes)
    start = torch.cat([spatial.new_zeros(1), (spatial[:, 0] * spatial[:, 1]).cumsum(0)[:-1]])
    args = (value, spatial, shapes, start, locations, weights, 64)
    ref = MultiScaleDeformableAttention()(*args)
    ours = _summed_deformable_attention_class()()(*args)
    assert ours.shape == ref.shape == (batch, queries, heads * dim)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_backend_uses_summed_deformable_attention(setup):
    from transformers.models.grounding_dino.modeling_grounding_dino import MultiScaleDeformableAttention

    settings, _, _ = setup
    model = load_detector(settings).model
    cores = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]
    assert cores and all(type(m).__name__ == "_SummedDeformableAttention" for m in cores)


def test_detect_post_processing_matches_transformers(setup):
    """Our numpy post-processing of the best queries gives what the processor's
    `post_process_grounded_object_detection` gives for the same queries."""
    import torch

    from refany3d.stages._views import read_view

    settings, ctx, views = setup
    det = load_detector(settings)
    options = override(settings, **{"detector.box_threshold": 0.05, "detector.text_threshold": 0.02}).detector
    images = [read_view(ctx.store, s) for s in views[:3]]
    prompts = ["red mug.", "wooden chair.", "toy car."]
    ours = det.detect(images, prompts, views[:3], options, 0)
    inputs = det.processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        outputs = det.model(**inputs)
    top = outputs.logits.sigmoid().amax(-1).topk(options.max_boxes, dim=1).indices[..., None]
    outputs.logits = outputs.logits.gather(1, top.expand(-1, -1, outputs.logits.shape[-1]))
    outputs.pred_boxes = outputs.pred_boxes.gather(1, top.expand(-1, -1, 4))
    ref = det.processor.post_process_grounded_object_detection(
        outputs,
        input_ids=inputs["input_ids"],
        threshold=options.box_threshold,
        text_threshold=options.text_threshold,
        target_sizes=[(im.height, im.width) for im in images],
    )
    assert sum(len(d.scores) for d in ours) > 0
    for d, r in zip(ours, ref, strict=True):
        np.testing.assert_allclose(d.scores, r["scores"].numpy(), rtol=1e-5)
        np.testing.assert_allclose(d.boxes, r["boxes"].numpy(), rtol=1e-5, atol=1e-4)
        assert d.phrases == list(r["text_labels"])


def test_adapted_attention_equals_stock_model_and_leaves_transformers_alone(setup):
    """The backend's deformable attention (no device-read check, summed core) is this instance's
    own: transformers' module keeps its check, a model built beside it keeps the stock layers,
    and both give the same outputs."""
    import torch
    import transformers.utils
    from transformers import GroundingDinoForObjectDetection
    from transformers.models.grounding_dino import modeling_grounding_dino
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        GroundingDinoMultiscaleDeformableAttention,
    )

    from refany3d.stages._views import read_views

    settings, ctx, views = setup
    det = load_detector(settings)
    assert modeling_grounding_dino.torch_compilable_check is transformers.utils.torch_compilable_check
    layers = [m for m in det.model.modules() if isinstance(m, GroundingDinoMultiscaleDeformableAttention)]
    assert layers and all(type(m).__name__ == "_HostCheckedDeformableAttention" for m in layers)
    stock = GroundingDinoForObjectDetection.from_pretrained(settings.detector.weights).eval()
    assert {
        type(m) for m in stock.modules() if isinstance(m, GroundingDinoMultiscaleDeformableAttention)
    } == {GroundingDinoMultiscaleDeformableAttention}
    # non-square images: levels of unequal height and width, whose order in the offsets matters
    images = [im.crop((0, 0, 96, 64)) for im in read_views(ctx.store, views[:2])]
    inputs = det.processor(images=images, text=["red mug.", "chair."], return_tensors="pt", padding=True)
    with torch.inference_mode():
        ours, ref = det.model(**inputs), stock(**inputs)
    torch.testing.assert_close(ours.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.pred_boxes, ref.pred_boxes, rtol=1e-4, atol=1e-5)


def test_adapt_deformable_attention_skips_unchecked_transformers(setup, monkeypatch):
    import transformers
    from transformers import GroundingDinoForObjectDetection

    from refany3d.models.detector.hf_grounding_dino import adapt_deformable_attention

    settings, _, _ = setup
    model = GroundingDinoForObjectDetection.from_pretrained(settings.detector.weights)
    monkeypatch.setattr(transformers, "__version__", "6.0.0")
    assert adapt_deformable_attention(model) == 0
    assert not [m for m in model.modules() if type(m).__name__.startswith("_")]
    monkeypatch.undo()
    assert adapt_deformable_attention(model) > 0


def test_summed_deformable_attention_checks_shapes_on_the_host():
    import torch

    from refany3d.models.detector.hf_grounding_dino import _summed_deformable_attention_class

    shapes = [(4, 4), (2, 2)]
    value = torch.randn(1, 21, 2, 8)  # one position more than the shapes hold
    with pytest.raises(RuntimeError, match="split"):
        _summed_deformable_attention_class()()(
            value,
            torch.tensor(shapes),
            shapes,
            None,
            torch.rand(1, 3, 2, 2, 4, 2),
            torch.rand(1, 3, 2, 2, 4),
            64,
        )
