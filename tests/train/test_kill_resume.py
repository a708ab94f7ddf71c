"""A training process killed with SIGKILL resumes from its newest listed checkpoint with the losses of
an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from refany3d.train.checkpoint import list_checkpoints
from refany3d.train.run import run_training
from tests.train.conftest import tiny_settings

pytestmark = pytest.mark.slow
FLAGS = {
    "data.resolution": 32, "data.condition_resolution": 32, "model.num_views": 2, "model.attention": "grouped",
    "model.gradient_checkpointing": "false", "checkpoint.every": 2, "checkpoint.keep": 100,
}  # fmt: skip


def test_sigkilled_run_resumes_with_the_uninterrupted_losses(dataset, tmp_path):
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "refany3d.cli",
        "train",
        "--data",
        str(dataset),
        "--out",
        str(out),
        "--steps",
        "100000",
    ]
    cmd += [f"--set={k}={v}" for k, v in {**FLAGS, "data.cache": tmp_path / "cache"}.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if list_checkpoints(str(out)) and list_checkpoints(str(out))[-1].step >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    newest = list_checkpoints(str(out))[-1].step
    last = newest + 2
    dotted = {k: v for k, v in FLAGS.items() if not k.startswith("data.res") and not k.startswith("model.")}
    resumed = run_training(
        tiny_settings(dataset, out, **dotted, **{"optim.steps": last, "data.cache": tmp_path / "cache"}),
        resume=True,
    )
    assert resumed.resumed_from == newest
    whole = run_training(tiny_settings(dataset, tmp_path / "whole", **dotted, **{"optim.steps": last}))
    losses = [r["loss"] for r in whole.metrics]
    assert [r["loss"] for r in resumed.metrics][-2:] == losses[-2:]
    history = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history == losses
