"""Data-parallel training on the CPU: 2 processes (torchrun, gloo) on the tiny model.

The global batch of 2 ranks x 1 sample equals 1 process x 2 samples (same positions, same per-position
noise), so the 2-process run must reproduce the single-process losses and adapters: that holds only
if the ranks read different samples (sharding) and average their gradients (sync). Its checkpoint
then resumes on 1 process and continues the single-process run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from refany3d.train.run import run_training
from tests.train.conftest import tiny_settings

pytestmark = pytest.mark.slow


def _flags(settings_dict: dict) -> list[str]:
    return [f"--set={k}={v}" for k, v in settings_dict.items()]


def _adapters(out) -> dict[str, torch.Tensor]:
    ckpt = out / "checkpoints" / "step-00000002" / "adapters"
    tensors = {}
    for f in sorted(ckpt.rglob("*.safetensors")):
        tensors.update({f"{f.parent.name}/{k}": v for k, v in load_file(f).items()})
    return tensors


def test_two_gloo_processes_shard_data_sync_gradients_and_resume_on_one(dataset, tmp_path):
    common = {
        "checkpoint.every": 2,
        "data.cache": str(tmp_path / "cache"),
        "optim.optimizer": "adamw",
        "optim.lr": 1e-3,
    }
    dist_out = tmp_path / "two"
    dotted = {
        "data.resolution": 32, "data.condition_resolution": 32, "model.num_views": 2,
        "model.attention": "grouped", "model.gradient_checkpointing": "false", **common,
    }  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "refany3d.cli", "train", "--data", str(dataset), "--out", str(dist_out), "--steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(cmd + _flags(dotted), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((dist_out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["counts"]["encoded"] == 4  # 4 distinct positions

    single = run_training(tiny_settings(dataset, tmp_path / "one", **common, **{"optim.batch_size": 2}))
    two = [json.loads(line)["loss"] for line in (dist_out / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(two, [r["loss"] for r in single.metrics[:2]], rtol=1e-5, atol=1e-6)
    ref, got = _adapters(tmp_path / "one"), _adapters(dist_out)
    assert ref.keys() == got.keys()
    # Adam divides by the gradient's running RMS, so where a gradient is ~0 the last bits of the
    # all-reduce (2 ranks' sum vs one batch of 2) can move an element by part of a step (lr 1e-3):
    # allow that in a few elements; a broken sync changes most elements by about a step.
    diff = torch.cat([(got[key] - ref[key]).abs().flatten() for key in ref])
    assert (diff > 2e-5).float().mean() < 0.01 and diff.max() < 2e-3, (diff > 2e-5).sum()

    resumed = run_training(tiny_settings(dataset, dist_out, **common, **{"optim.batch_size": 2}), resume=True)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    torch.testing.assert_close(
        [r["loss"] for r in resumed.metrics], [r["loss"] for r in single.metrics], rtol=1e-4, atol=1e-6
    )
