import numpy as np
import pytest
import torch

from refany3d.models.segmenter import SamSegmenter, load_segmenter
from refany3d.models.segmenter.sam import _encoder_shape
from refany3d.models.weights import WeightsError
from refany3d.records import MASK
from refany3d.stages.context import StageContext
from refany3d.stages.segment import segment
from refany3d.storage.store import ArtifactStore
from refany3d.testing.checkpoints import tiny_sam_checkpoint
from refany3d.testing.views import drawn_views, perception_settings, run_batched


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sam")
    ckpt = tiny_sam_checkpoint(root / "sam_tiny.pth")
    settings = perception_settings(
        **{
            "segmenter.backend": "sam",
            "segmenter.weights": str(ckpt),
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


def test_encoder_shape_reads_vit_b_layout():
    from segment_anything import sam_model_registry

    shape = _encoder_shape(sam_model_registry["vit_b"]().state_dict())
    assert shape == {
        "encoder_embed_dim": 768,
        "encoder_depth": 12,
        "encoder_num_heads": 12,
        "encoder_global_attn_indexes": [2, 5, 8, 11],
        "image_size": 1024,
    }


def test_segment_stage_sam_stores_view_sized_masks(setup):
    settings, ctx, views = setup
    assert isinstance(load_segmenter(settings), SamSegmenter)
    result = segment(views, settings, ctx)
    assert len(result.kept) == 5
    from refany3d.stages._views import read_mask

    for s in result.kept:
        mask = np.asarray(read_mask(ctx.store, s.artifacts[MASK]))
        assert mask.shape == (96, 96) and set(np.unique(mask)) <= {0, 255}
        assert 0 <= s.metrics["mask_area_ratio"] <= 1 and s.backends["segment"] == "sam"


def test_segment_sam_batch_of_one_equals_batch_of_five(setup):
    settings, ctx, views = setup
    one = run_batched(segment, views, settings, ctx, "segmenter", 1)
    five = run_batched(segment, views, settings, ctx, "segmenter", 5)
    assert [s.artifacts[MASK] for s in one.kept] == [s.artifacts[MASK] for s in five.kept]
    np.testing.assert_allclose(
        [s.metrics["mask_score"] for s in one.kept], [s.metrics["mask_score"] for s in five.kept], atol=1e-4
    )


def test_sam_segmenter_wrong_model_type_raises(tmp_path):
    from segment_anything import sam_model_registry

    torch.save(sam_model_registry["vit_b"]().state_dict(), tmp_path / "b.pth")
    with pytest.raises(WeightsError, match="is a vit_b checkpoint but segmenter.model_type=vit_h"):
        SamSegmenter(str(tmp_path / "b.pth"), model_type="vit_h")


@pytest.mark.parametrize("variant", ["sdpa", "augmented"])
def test_sdpa_attention_matches_segment_anything_attention(variant):
    from refany3d.models.segmenter.sam import _augmented_attention_class, _sdpa_attention_class, build_sam

    torch.manual_seed(0)
    sam = build_sam(32, 2, 2, [1], image_size=256)
    for name, p in sam.named_parameters():
        if "rel_pos" in name:
            torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        expected = sam.image_encoder(x)
        cls = _sdpa_attention_class() if variant == "sdpa" else _augmented_attention_class()
        for block in sam.image_encoder.blocks:
            block.attn.__class__ = cls
        got = sam.image_encoder(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_segment_compiled_encoder_equals_plain(setup):
    """The `segmenter.compile` fast path (compiled encoder blocks) gives the plain masks and scores."""
    from refany3d.models._torch import compile_layers
    from refany3d.stages._views import read_views

    settings, ctx, views = setup
    sam = SamSegmenter(settings.segmenter.weights, model_type="vit_h")
    images, boxes = read_views(ctx.store, views[:3]), [s.box for s in views[:3]]
    plain = sam.segment(images, boxes, views[:3], settings.segmenter, 0)
    assert compile_layers(sam.model, sam.compile_layers, backend="aot_eager") == 2
    fast = sam.segment(images, boxes, views[:3], settings.segmenter, 0)
    for a, b in zip(plain, fast, strict=True):
        assert (a.mask != b.mask).mean() < 1e-3
        assert a.score == pytest.approx(b.score, abs=1e-5)
