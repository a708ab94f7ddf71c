"""The `train` flow: newest dataset version, artifacts, and the `train/gpu` deployment run by a real
Prefect server and process worker on the CPU (retrains, then resumes from the newest checkpoint)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from refany3d.flows.train import newest_dataset
from tests.flows._runs import artifacts, wait_flow_run
from tests.flows.conftest import BIN, stop
from tests.train._shards import rendered_rows, write_dataset

TINY = {
    "name": "tiny-train",
    "data": {"resolution": 32, "condition_resolution": 32},
    "model": {"num_views": 2, "attention": "grouped", "gradient_checkpointing": False},
    "checkpoint": {"every": 2, "sample_every": 2, "sample_steps": 2},
    "runtime": {"device": "cpu", "dtype": "float32"},
}


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two dataset versions (build directories with stats.json); v2 finished last."""
    root = tmp_path_factory.mktemp("datasets")
    rows = rendered_rows(3)
    for i, name in enumerate(("v1", "v2")):
        write_dataset(root / name, rows[: 2 + i])
        (root / name / "stats.json").write_text("{}")
        os.utime(root / name / "stats.json", (1_000_000 + i, 1_000_000 + i))
    return root


def test_newest_dataset_picks_the_last_finished_build(versions):
    assert newest_dataset(str(versions)) == str(versions / "v2")
    assert newest_dataset(str(versions / "v1")) == str(versions / "v1")
    with pytest.raises(FileNotFoundError, match="dataset"):
        newest_dataset(str(versions / "missing"))


@pytest.mark.slow
def test_train_deployment_on_gpu_pool_retrains_then_resumes(prefect_server, versions, tmp_path):
    deploy = subprocess.run(
        [str(BIN / "refany3d"), "deploy"], env=prefect_server.env, capture_output=True, text=True, timeout=180
    )
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    assert re.search(r"train/gpu\s+pool gpu\s+registered", deploy.stdout)
    with prefect_server.client() as client:
        dep = client.read_deployment_by_name("train/gpu")
    assert dep.entrypoint == "refany3d.flows.train.train" and dep.work_pool_name == "gpu"
    assert dep.parameters["resume"] and dep.parameters["settings"]["runtime"]["device"] == "cuda"

    env = {**prefect_server.env, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--type", "process"],
        env=env, cwd=tmp_path, stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    out = tmp_path / "train"
    runs = []
    try:
        for steps in (2, 4):
            params = {"dataset": str(versions), "out": str(out), "steps": steps, "settings": TINY}
            trigger = subprocess.run(
                [str(BIN / "prefect"), "deployment", "run", "train/gpu", "--params", json.dumps(params)],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert trigger.returncode == 0, trigger.stdout + trigger.stderr
            run_id = re.search(r"UUID: ([0-9a-f-]{36})", trigger.stdout).group(1)
            with prefect_server.client() as client:
                runs.append(wait_flow_run(client, run_id, timeout=400))
            assert runs[-1].state.is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
    finally:
        stop(worker)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_from"] == 2  # second run resumed
    assert summary["samples"] == 3  # the newest version (v2 has 3 rows, v1 2)
    assert summary["tiny"] and "tiny random-weight" in summary["base"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    with prefect_server.client() as client:
        for _ in range(30):
            arts = {a.key: a for a in artifacts(client, runs[-1].id)}
            if len(arts) >= 4:
                break
            time.sleep(1)
    assert {
        "tiny-train-loss-curve",
        "tiny-train-samples",
        "tiny-train-checkpoints",
        "tiny-train-summary",
    } <= set(arts)
    assert "data:image/png;base64," in arts["tiny-train-loss-curve"].data
    assert "step-00000004" in arts["tiny-train-checkpoints"].data
    assert "tiny random-weight" in arts["tiny-train-summary"].data
