"""CLIP / DINOv2 metrics on tiny random-weight models saved in the standard layout and loaded back."""

import numpy as np
import pytest

from refany3d.evaluate.semantic import (
    ClipScorer,
    DinoScorer,
    clip_metrics,
    dino_metrics,
    remove_background,
    resolve_weights,
)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(n)]


def test_clip_metrics_image_equal_to_a_view_scores_max_one(clip_dir):
    scorer = ClipScorer(clip_dir)
    views = _images(3)
    out = clip_metrics(scorer, views[1], views, "a red chair")
    assert out["clip_i_max"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= out["clip_i_mean"] < out["clip_i_max"]
    assert -1.0 <= out["clip_t"] <= 1.0
    other = clip_metrics(scorer, views[1], views, "a blue lamp on a table")["clip_t"]
    assert other != pytest.approx(out["clip_t"])  # the prompt reaches the text tower


def test_dino_metrics_image_equal_to_a_view_scores_max_one(dino_dir):
    scorer = DinoScorer(dino_dir)
    views = _images(3, seed=1)
    out = dino_metrics(scorer, views[2], views)
    assert out["dino_max"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= out["dino_mean"] < out["dino_max"]
    assert dino_metrics(scorer, _images(1, seed=9)[0], views)["dino_max"] < 1.0 - 1e-4


def test_resolve_weights_missing_directory_gives_a_note(tmp_path):
    path, note = resolve_weights("metrics.clip_weights", str(tmp_path / "nope"), ("clip_t",))
    assert path is None and note == (
        f"metrics.clip_weights: {str(tmp_path / 'nope')!r} is not a directory or a hub id in the local cache: "
        "clip_t skipped"
    )
    path, note = resolve_weights("metrics.dino_weights", "", ("dino_mean", "dino_max"))
    assert path is None and note == (
        "metrics.dino_weights is empty: dino_mean, dino_max skipped (set it to a local weights directory)"
    )


def test_remove_background_whitens_outside_the_foreground():
    image = np.zeros((4, 4, 3), np.uint8)
    fg = np.zeros((4, 4), bool)
    fg[1, 2] = True
    out = remove_background(image, fg)
    assert (out[1, 2] == 0).all() and (out[~fg] == 255).all()
