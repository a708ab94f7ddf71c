import numpy as np
import pytest

pytest.importorskip("groundingdino", reason="groundingdino-py not installed")

from refany3d.models.detector import GroundingDinoDetector, load_detector  # noqa: E402
from refany3d.models.weights import WeightsError  # noqa: E402
from refany3d.stages.context import StageContext  # noqa: E402
from refany3d.stages.detect import detect  # noqa: E402
from refany3d.storage.store import ArtifactStore  # noqa: E402
from refany3d.testing.checkpoints import tiny_groundingdino_py  # noqa: E402
from refany3d.testing.views import drawn_views, perception_settings, run_batched  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gdino_py")
    config, ckpt, bert = tiny_groundingdino_py(root)
    settings = perception_settings(
        **{
            "detector.backend": "groundingdino",
            "detector.weights": str(ckpt),
            "detector.config": str(config),
            "detector.text_encoder": str(bert),
            "detector.box_threshold": 0.0,
            "detector.text_threshold": 0.0,
            "detector.image_size": 64,
        }
    )
    ctx = StageContext(store=ArtifactStore(str(root / "artifacts")), seed=0)
    return settings, ctx, drawn_views(ctx.store, 5, size=64)


def test_detect_stage_groundingdino_py_keeps_boxes_inside_view(setup):
    settings, ctx, views = setup
    assert isinstance(load_detector(settings), GroundingDinoDetector)
    result = detect(views, settings, ctx)
    assert result.kept
    for s in result.kept:
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        assert 0 <= s.metrics["box_score"] <= 1 and s.backends["detect"] == "groundingdino"


def test_detect_groundingdino_py_batch_of_one_equals_batch_of_five(setup):
    settings, ctx, views = setup
    one = run_batched(detect, views, settings, ctx, "detector", 1)
    five = run_batched(detect, views, settings, ctx, "detector", 5)
    assert [s.sample_id for s in one.kept] == [s.sample_id for s in five.kept]
    np.testing.assert_allclose([s.box for s in one.kept], [s.box for s in five.kept], atol=1e-3)


def test_groundingdino_detector_mismatched_checkpoint_raises(setup, tmp_path):
    import torch

    settings, _, _ = setup
    torch.save({"model": {}}, tmp_path / "empty.pth")
    with pytest.raises(WeightsError, match="missing tensors"):
        GroundingDinoDetector(
            str(tmp_path / "empty.pth"),
            text_encoder=settings.detector.text_encoder,
            config=settings.detector.config,
        )


def test_build_groundingdino_wraps_only_its_own_bert(setup):
    """Our model's BERT is `_BertCompat`; groundingdino-py's module keeps its own BertModelWarper."""
    import groundingdino.models.GroundingDINO.groundingdino as gd_module
    from groundingdino.models.GroundingDINO.bertwarper import BertModelWarper

    settings, _, _ = setup
    det = load_detector(settings)
    assert type(det.model.bert).__name__ == "_BertCompat"
    assert gd_module.BertModelWarper is BertModelWarper
