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
from refany3d.models.flux.components import tiny_tokenizer


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_tokenizer(bos=True)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        directory
    )
    return directory


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    directory = tmp_path_factory.mktemp("dino")
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=28, patch_size=14
    )
    Dinov2Model(config).save_pretrained(directory)
    BitImageProcessor(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(directory)
    return directory


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
    path, note = resolve_weights("evaluate.clip_weights", str(tmp_path / "nope"))
    assert path is None and "evaluate.clip_weights" in note and "skipped" in note
    path, note = resolve_weights("evaluate.dino_weights", "")
    assert path is None and note == (
        "evaluate.dino_weights is empty: its metrics are skipped (set it to a local directory)"
    )


def test_remove_background_whitens_outside_the_foreground():
    image = np.zeros((4, 4, 3), np.uint8)
    fg = np.zeros((4, 4), bool)
    fg[1, 2] = True
    out = remove_background(image, fg)
    assert (out[1, 2] == 0).all() and (out[~fg] == 255).all()
