"""`refany3d train`: bad settings fail before any work (exit 2, one line naming the setting); a
short run on the tiny model prints its label and writes its outputs."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from refany3d.cli import main
from refany3d.config import TrainSettings, override
from refany3d.train.trainer import resolve_device

TINY = [
    "--set=data.resolution=32", "--set=data.condition_resolution=32", "--set=model.num_views=2",
    "--set=model.attention=grouped", "--set=model.gradient_checkpointing=false",
]  # fmt: skip


def test_train_missing_pretrained_directory_exits_2_naming_the_setting(dataset, tmp_path, capsys):
    code = main(
        [
            "train",
            "--data",
            str(dataset),
            "--out",
            str(tmp_path),
            "--set",
            f"model.pretrained={tmp_path}/none",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "model.pretrained" in err and not (tmp_path / "checkpoints").exists()


def test_train_incomplete_pretrained_directory_exits_2(dataset, tmp_path, capsys):
    (tmp_path / "flux" / "transformer").mkdir(parents=True)
    code = main(
        [
            "train",
            "--data",
            str(dataset),
            "--out",
            str(tmp_path / "o"),
            "--set",
            f"model.pretrained={tmp_path / 'flux'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "model.pretrained" in err and "missing" in err


def test_train_without_shards_exits_2_naming_data_shards(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert code == 2 and "data.shards" in capsys.readouterr().err


def test_train_runs_tiny_model_and_labels_it(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--data",
            str(dataset),
            "--out",
            str(out),
            "--steps",
            "2",
            f"--set=data.cache={tmp_path}/c",
            *TINY,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "tiny random-weight" in printed and "trained to step 2" in printed
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    code = main(
        [
            "train",
            "--data",
            str(dataset),
            "--out",
            str(out),
            "--steps",
            "3",
            "--resume",
            f"--set=data.cache={tmp_path}/c",
            *TINY,
        ]
    )
    assert code == 0 and "resumed from 2" in capsys.readouterr().out


def test_train_data_accepts_one_shard_file(dataset, tmp_path, capsys):
    shard = next((dataset / "data").glob("*.parquet"))
    (tmp_path / "build" / "data").mkdir(parents=True)
    one = tmp_path / "build" / "data" / shard.name
    one.write_bytes(shard.read_bytes())
    code = main(["train", "--data", str(one), "--out", str(tmp_path / "run"), "--steps", "1", *TINY])
    assert code == 0, capsys.readouterr().err
    assert list((tmp_path / "build" / "cache").iterdir())  # the dataset's cache, beside data/


def test_train_into_a_used_out_without_resume_exits_2_in_one_line(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(dataset), "--out", str(out), f"--set=data.cache={tmp_path}/c", *TINY]
    assert main([*args, "--steps", "2"]) == 0
    capsys.readouterr()
    metrics = (out / "metrics.jsonl").read_bytes()
    assert main([*args, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint.dir" in err and "--resume" in err
    assert "Traceback" not in err and (out / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_cuda_without_cuda_exits_2_in_one_line(dataset, tmp_path, capsys):
    code = main(["train", "--data", str(dataset), "--out", str(tmp_path / "o"), "--set=runtime.device=cuda"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "runtime.device: 'cuda', but this machine has no CUDA" in err
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_auto_falls_back_to_cpu_and_logs_it(caplog):
    with caplog.at_level(logging.WARNING, logger="refany3d.train"):
        settings = resolve_device(override(TrainSettings(), **{"runtime.device": "auto"}))
    assert settings.runtime.device == "cpu"
    assert "runtime.device=auto: no CUDA on this machine, training on the CPU" in caplog.text
