"""Held-out split, warm start, held-out evaluation and the promotion rule of scheduled retraining."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from refany3d.evaluate.heldout import compare, decide, evaluate_adapters
from refany3d.train import data
from refany3d.train.checkpoint import list_checkpoints
from refany3d.train.run import run_training
from refany3d.train.trainer import build_trainer, warm_start
from tests.train._shards import write_dataset
from tests.train.conftest import tiny_settings


def test_build_index_holdout_splits_by_sample_id_the_same_in_every_dataset(rows, tmp_path):
    files = data.shard_files(str(write_dataset(tmp_path / "a", rows)))
    train = [r.sample_id for g in data.build_index(files, 0.5) for r in g]
    held = [r.sample_id for g in data.build_index(files, 0.5, evaluation=True) for r in g]
    assert sorted(train + held) == sorted(r["sample_id"] for r in rows) and not set(train) & set(held)
    assert train and held  # this fixture's 4 ids split 2 / 2 or so
    other = data.shard_files(str(write_dataset(tmp_path / "b", rows[1:])))  # another version
    assert {r.sample_id for g in data.build_index(other, 0.5, evaluation=True) for r in g} == set(held) - {
        rows[0]["sample_id"]
    }
    assert [r.sample_id for g in data.build_index(files) for r in g] == [r["sample_id"] for r in rows]


def test_compare_and_decide_refuse_exactly_the_regressions():
    promoted = {"silhouette_iou": 0.5, "surface_distance": 0.10, "texture_error": 0.2}
    better = {"silhouette_iou": 0.6, "surface_distance": 0.05, "texture_error": 0.2}
    rows = compare(better, promoted, tolerance=0.0)
    assert [r["regressed"] for r in rows] == [False, False, False]
    worse = {**better, "surface_distance": 0.11}  # lower is better: 0.11 > 0.10 regresses
    assert [r["metric"] for r in compare(worse, promoted, 0.0) if r["regressed"]] == ["surface_distance"]
    assert not any(r["regressed"] for r in compare(worse, promoted, tolerance=0.02))
    assert compare({"silhouette_iou": math.nan}, promoted, 0.0) == []

    def reports(candidate, baseline=None):
        out = {"candidate": {"mean": candidate}}
        return out | ({"promoted": {"mean": baseline}} if baseline else {})

    assert decide(reports(worse), 0.0)["promote"]  # the first run is promoted
    assert decide(reports(better, promoted), 0.0)["promote"]
    refused = decide(reports(worse, promoted), 0.0)
    assert not refused["promote"] and "surface_distance" in refused["reason"]
    assert not decide(reports({"silhouette_iou": math.nan}, promoted), 0.0)["promote"]


def test_warm_start_loads_the_given_adapters_into_a_fresh_run(dataset, tmp_path):
    first = tmp_path / "a"
    run_training(tiny_settings(dataset, first, **{"optim.steps": 2}))
    trained = build_trainer(
        tiny_settings(dataset, tmp_path / "x", **{"checkpoint.init_adapters": str(first)})
    )
    fresh = [p.detach().clone() for p in trained.model.trainable_parameters()]
    warm_start(trained)
    loaded = list(trained.model.trainable_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(fresh, loaded))
    reference = build_trainer(tiny_settings(dataset, tmp_path / "y"))
    from refany3d.models.flux.io import load_adapters

    load_adapters(reference.model, list_checkpoints(str(first))[-1].url + "/adapters")
    assert all(torch.equal(a, b) for a, b in zip(reference.model.trainable_parameters(), loaded))
    warm = run_training(
        tiny_settings(dataset, tmp_path / "b", **{"optim.steps": 1, "checkpoint.init_adapters": str(first)})
    )
    cold = run_training(tiny_settings(dataset, tmp_path / "c", **{"optim.steps": 1}))
    assert warm.summary["warm_start"] and not cold.summary["warm_start"]
    assert warm.metrics[0]["loss"] != cold.metrics[0]["loss"]


def test_evaluate_adapters_scores_candidate_and_promoted_on_the_same_held_out_samples(rows, tmp_path):
    root = write_dataset(tmp_path / "data", rows)
    common = {"data.holdout_fraction": 0.5, "optim.steps": 2}
    a = run_training(tiny_settings(root, tmp_path / "a", **common))
    run_training(tiny_settings(root, tmp_path / "b", **common, **{"optim.seed": 1}))
    held = {
        r.sample_id for g in data.build_index(data.shard_files(str(root)), 0.5, evaluation=True) for r in g
    }
    assert a.summary["samples"] == len(rows) - len(held)  # held-out rows are not trained on
    settings = tiny_settings(root, tmp_path / "a", **common)
    reports = evaluate_adapters(settings, {"candidate": str(tmp_path / "b"), "promoted": str(tmp_path / "a")})
    for report in reports.values():
        assert set(report["samples"]) == held
        assert {"silhouette_iou", "surface_distance", "texture_error"} <= set(report["mean"])
        assert any("clip" in note.lower() for note in report["notes"])  # no CLIP weights here
    # other adapters generate other samples
    assert reports["candidate"]["mean"]["surface_distance"] != reports["promoted"]["mean"]["surface_distance"]
    again = evaluate_adapters(settings, {"candidate": str(tmp_path / "b")})
    np.testing.assert_equal(again["candidate"]["mean"], reports["candidate"]["mean"])  # seeded
    with pytest.raises(ValueError, match="holdout_fraction"):
        evaluate_adapters(tiny_settings(root, tmp_path / "a"), {"candidate": str(tmp_path / "a")})


def test_held_out_samples_are_what_a_users_pipeline_of_the_run_generates(rows, tmp_path):
    from refany3d.evaluate.heldout import generate, heldout_pipeline, heldout_rows, row_views
    from refany3d.sampling import RefAny3DPipeline

    root = write_dataset(tmp_path / "data", rows)
    settings = tiny_settings(root, tmp_path / "run", **{"data.holdout_fraction": 0.5, "optim.steps": 1})
    run_training(settings)
    pipe = heldout_pipeline(settings).load_lora_weights(tmp_path / "run")
    user = RefAny3DPipeline.from_pretrained(tmp_path / "run")  # flags, resolutions, steps: config.json
    raw = data.decode_row(heldout_rows(settings, 1)[0], settings.data, settings.model.num_views)
    image, point_map = generate(pipe, raw, seed=3)
    mine, mine_pm = user.generate(row_views(raw), raw.caption, generator=torch.Generator().manual_seed(3))
    assert image.shape == (32, 32, 3) and np.array_equal(image, mine) and np.array_equal(point_map, mine_pm)


def test_a_promoted_run_of_other_model_flags_is_drawn_with_its_own(rows, tmp_path):
    import json
    import shutil

    root = write_dataset(tmp_path / "data", rows)
    settings = tiny_settings(root, tmp_path / "a", **{"data.holdout_fraction": 0.5, "optim.steps": 1})
    run_training(settings)
    shutil.copytree(tmp_path / "a", tmp_path / "old")
    (step,) = (tmp_path / "old" / "checkpoints").glob("step-*")
    config = json.loads((step / "config.json").read_text())
    (step / "config.json").write_text(json.dumps({**config, "text_agnostic": False}))  # an earlier flag
    (step / "manifest.json").write_text(  # the digest of the edited config.json, as it was written
        json.dumps({**json.loads((step / "manifest.json").read_text()), "digests": {}})
    )
    reports = evaluate_adapters(
        settings, {"candidate": str(tmp_path / "a"), "promoted": str(tmp_path / "old")}
    )
    assert set(reports["promoted"]["samples"]) == set(reports["candidate"]["samples"])
    # same adapters, another attention rule for the point map: other samples
    assert reports["promoted"]["mean"] != reports["candidate"]["mean"]
