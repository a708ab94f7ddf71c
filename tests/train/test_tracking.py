"""Experiment tracking (`checkpoint.report_to=tensorboard`, accelerate's trackers) and the
append-only metrics.jsonl: the scalar tags and previews land in the run directory, a resumed run
shows each step once, bad settings stop in one line."""

from __future__ import annotations

import json
import shutil

import pytest

from refany3d.cli import main
from refany3d.train.run import run_training
from refany3d.train.tracking import SCALARS
from tests.train.conftest import tiny_settings

TAGS = {f"train/{name}" for name in SCALARS}


def _events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_run_directory_holds_the_scalar_tags_and_previews(dataset, tmp_path):
    out = tmp_path / "run"
    settings = tiny_settings(
        dataset,
        out,
        **{"checkpoint.report_to": "tensorboard", "optim.steps": 3, "checkpoint.sample_every": 2},
    )
    result = run_training(settings)
    events = _events(out / "tensorboard" / settings.name)
    assert TAGS <= set(events.Tags()["scalars"])
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert (
        losses
        == [(r["step"], pytest.approx(r["loss"])) for r in result.metrics]
        == [(r["step"], pytest.approx(r["loss"])) for r in _metrics(out)]
    )
    assert [e.step for e in events.Scalars("train/samples_per_s")] == [1, 2, 3]
    assert events.Tags()["images"] == ["preview"]
    assert [e.step for e in events.Images("preview")] == [2, 3]  # sample_every 2, and the last step


def test_report_to_none_writes_no_tracker_files(dataset, tmp_path):
    run_training(tiny_settings(dataset, tmp_path / "run", **{"optim.steps": 1}))
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_resumed_run_shows_each_step_once_in_tensorboard_and_metrics_jsonl(dataset, tmp_path):
    out = tmp_path / "run"
    common = {"checkpoint.report_to": "tensorboard", "checkpoint.every": 2, "checkpoint.keep": 5}
    run_training(tiny_settings(dataset, out, **common, **{"optim.steps": 3}))
    # as if killed after step 3 was logged but before its checkpoint was listed
    listing = out / "checkpoints" / "manifest.json"
    entries = json.loads(listing.read_text())["checkpoints"]
    listing.write_text(json.dumps({"checkpoints": [e for e in entries if e["step"] == 2]}))
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    stale = _metrics(out)[2]["loss"]
    result = run_training(tiny_settings(dataset, out, **common, **{"optim.steps": 4}), resume=True)
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]
    assert _metrics(out)[2]["loss"] == pytest.approx(stale)  # exact resume: the same step 3 again
    events = _events(out / "tensorboard" / result.summary["name"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_metrics_jsonl_is_appended_not_rewritten(dataset, tmp_path):
    out = tmp_path / "run"

    def note(row):  # a line another writer adds between two flushes must survive the next one
        if row["step"] == 2:  # step 1 is on disk (log_every 1): append after it
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": 0, "note": "kept"}) + "\n")

    run_training(tiny_settings(dataset, out, **{"optim.steps": 2, "checkpoint.log_every": 1}), on_step=note)
    assert [(r["step"], r.get("note")) for r in _metrics(out)] == [(1, None), (0, "kept"), (2, None)]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            ["--set=checkpoint.report_to=wandb"],
            "checkpoint.report_to: 'wandb' is not one of none, tensorboard",
        ),
        (
            ["--set=checkpoint.report_to=tensorboard", "--out", "memory://refany3d-run"],
            "checkpoint.logging_dir: checkpoint.dir 'memory://refany3d-run' is not local",
        ),
    ],
)
def test_bad_tracking_settings_exit_2_in_one_line(dataset, tmp_path, capsys, setting, message):
    args = ["train", "--data", str(dataset), "--out", str(tmp_path / "run"), "--steps", "1", *setting]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
