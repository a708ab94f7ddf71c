import numpy as np
import pytest

from refany3d.models.detector import Detection
from refany3d.stages import detect as detect_module
from refany3d.stages.context import StageContext
from refany3d.stages.detect import EMPTY_PROMPT, NO_DETECTION, _prompt, detect
from refany3d.storage.store import ArtifactStore
from refany3d.testing.views import drawn_views, perception_settings, synthetic_views


class _StubDetector:
    name = "stub"

    def __init__(self, detections):
        self.detections = detections
        self.prompts = None

    def detect(self, images, prompts, samples, options, seed):
        self.prompts = list(prompts)
        return self.detections[: len(images)]


@pytest.fixture
def drawn(tmp_path):
    ctx = StageContext(store=ArtifactStore(str(tmp_path)), seed=0)
    return ctx, drawn_views(ctx.store, 1)


def _stub(monkeypatch, detections):
    stub = _StubDetector(detections)
    monkeypatch.setattr(detect_module, "load_detector", lambda settings: stub)
    return stub


def test_prompt_is_lowercase_and_ends_with_a_period():
    assert _prompt("  Red  Mug ") == "red mug."
    assert _prompt("teapot.") == "teapot."
    assert _prompt(" ") == ""


def test_detect_keeps_the_highest_scoring_usable_box(monkeypatch, drawn):
    ctx, views = drawn
    boxes = np.array(
        [[1, 1, 50, 50], [5, 5, 5, 40], [10, 12, 60, 70], [0, 0, 90, 90], [20, 20, 30, 30]], np.float32
    )
    scores = np.array([0.95, 0.9, 0.7, 0.3, 0.6], np.float32)
    phrases = ["", "red mug", "red mug", "red mug", "mug"]  # '' = no token matched; [1] has zero width
    stub = _stub(monkeypatch, [Detection(boxes, scores, phrases)])
    result = detect(views, perception_settings(**{"detector.box_threshold": 0.35}), ctx)
    assert stub.prompts == ["red mug."]
    (kept,) = result.kept
    assert kept.box == [10.0, 12.0, 60.0, 70.0]
    assert kept.metrics["box_score"] == pytest.approx(0.7)
    assert kept.backends["detect"] == "stub"


def test_detect_clips_the_box_to_the_view(monkeypatch, drawn):
    ctx, views = drawn
    _stub(
        monkeypatch, [Detection(np.array([[-5, 10, 120, 50]], np.float32), np.ones(1, np.float32), ["mug"])]
    )
    (kept,) = detect(views, perception_settings(), ctx).kept
    assert kept.box == [0.0, 10.0, 96.0, 50.0]


def test_detect_without_a_box_above_threshold_drops_no_detection(monkeypatch, drawn):
    ctx, views = drawn
    _stub(
        monkeypatch, [Detection(np.array([[1, 1, 50, 50]], np.float32), np.array([0.2], np.float32), ["mug"])]
    )
    result = detect(views, perception_settings(**{"detector.box_threshold": 0.35}), ctx)
    assert not result.kept
    (rej,) = result.dropped
    assert (rej.stage, rej.reason, rej.metric) == ("detect", NO_DETECTION, pytest.approx(0.2))
    assert NO_DETECTION == "no_detection"


def test_detect_empty_item_drops_empty_prompt(monkeypatch, drawn):
    ctx, views = drawn
    stub = _stub(monkeypatch, [])
    result = detect([views[0].replace(item="  ")], perception_settings(), ctx)
    assert [r.reason for r in result.dropped] == ["empty_prompt"] == [EMPTY_PROMPT]
    assert stub.prompts is None  # no model call for nothing to look for


def test_detect_truth_backend_boxes_synthetic_views(tmp_path):
    views, ctx, settings = synthetic_views(tmp_path)
    result = detect(views, settings, ctx)
    assert len(result.kept) == len(views) == 4 and not result.dropped
    for s in result.kept:
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
        assert s.backends["detect"] == "truth" and s.metrics["box_score"] == 1.0
    again = detect(views, settings, ctx)
    assert [s.box for s in again.kept] == [s.box for s in result.kept]
