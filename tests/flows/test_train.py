"""The `train` flow: scheduled retraining. One run per dataset version (warm-started from the promoted
adapters, evaluated on held-out samples, promoted unless it regresses), in process and as a served
deployment on an interval schedule of a real Prefect server; `train/gpu` registered by `deploy`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from refany3d.config import SettingsError
from refany3d.flows.train import newest_dataset
from tests.flows._runs import artifacts
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


RETRAIN = {
    **TINY,
    "data": {**TINY["data"], "holdout_fraction": 0.5},  # train-0-0001..3 held out, 0 and 4 trained
    "retrain": {"eval_samples": 2},
}


def land_build(root, name: str, rows, when: float | None = None):
    """A finished build `root/name`: shards, stats.json (newest last), version.json."""
    from refany3d.storage.shards import list_tables
    from refany3d.storage.versions import write_version

    build = write_dataset(root / name, rows)
    (build / "stats.json").write_text("{}")
    if when is not None:
        os.utime(build / "stats.json", (when, when))
    return write_version(str(build), list_tables(str(build)))


def _decision(out, version) -> dict:
    return json.loads((out / "runs" / version.version / "decision.json").read_text())


def _consistent(decision: dict) -> None:
    """A decision promotes exactly when no metric regressed (and there was one to compare)."""
    regressed = [r["metric"] for r in decision["comparison"] if r["regressed"]]
    if decision["previous"] is None:
        assert decision["promote"]
    else:
        assert decision["promote"] == (bool(decision["comparison"]) and not regressed), decision


@pytest.fixture(scope="module")
def retrain_rows():
    return rendered_rows(5)


def test_train_flow_trains_each_version_once_warm_starts_and_promotes(
    prefect_harness, retrain_rows, tmp_path
):
    from refany3d.flows.train import train
    from refany3d.train.checkpoint import resolve_adapters

    builds, out = tmp_path / "builds", tmp_path / "retrain"
    v1 = land_build(builds, "b1", retrain_rows[:3], 1_000_000)
    params = {"dataset": str(builds), "out": str(out), "steps": 2, "settings": RETRAIN}
    first = train(**params)
    assert first == {"status": "promoted", "version": v1.version, "out": str(out / "runs" / v1.version)}
    pointer = json.loads((out / "promoted.json").read_text())
    assert pointer["version"] == v1.version and pointer["reason"] == "no promoted run yet"
    assert resolve_adapters(out / "promoted.json")[0] == resolve_adapters(out / "runs" / v1.version)[0]
    assert train(**params)["status"] == "unchanged"  # no new build: nothing trained
    assert len(list((out / "runs" / v1.version / "checkpoints").glob("step-*"))) == 1

    v2 = land_build(builds, "b2", retrain_rows, 1_000_001)
    tolerant = {**RETRAIN, "retrain": {"eval_samples": 2, "tolerance": 1e9}}
    second = train(**{**params, "settings": tolerant})
    decision = _decision(out, v2)
    assert second["status"] == "promoted" and decision["warm_start"] == pointer["checkpoint"]
    assert {r["metric"] for r in decision["comparison"]} >= {"silhouette_iou", "surface_distance"}
    summary = json.loads((out / "runs" / v2.version / "summary.json").read_text())
    assert summary["samples"] == 2 and summary["steps"] == 2 and summary["warm_start"]
    assert json.loads((out / "promoted.json").read_text())["version"] == v2.version

    v3 = land_build(builds, "b3", retrain_rows[:4], 1_000_002)
    fresh = {**RETRAIN, "retrain": {"eval_samples": 2, "warm_start": False}}
    third = train(**{**params, "settings": fresh})
    decision = _decision(out, v3)
    assert decision["warm_start"] is None and third["status"] in ("promoted", "refused")
    _consistent(decision)
    promoted = json.loads((out / "promoted.json").read_text())["version"]
    assert promoted == (v3.version if decision["promote"] else v2.version)

    land_build(builds, "b4", retrain_rows[1:], 1_000_003)
    with pytest.raises(SettingsError, match="data.holdout_fraction"):  # before any training
        train(**{**params, "settings": TINY})
    assert len(list((out / "runs").iterdir())) == 3


@pytest.mark.slow
def test_deploy_registers_train_on_the_gpu_pool(prefect_server):
    deploy = subprocess.run(
        [str(BIN / "refany3d"), "deploy"], env=prefect_server.env, capture_output=True, text=True, timeout=180
    )
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    assert re.search(r"train/gpu\s+pool gpu\s+registered", deploy.stdout)
    with prefect_server.client() as client:
        dep = client.read_deployment_by_name("train/gpu")
    assert dep.entrypoint == "refany3d.flows.train.train" and dep.work_pool_name == "gpu"
    assert dep.parameters["resume"] and dep.parameters["settings"]["runtime"]["device"] == "cuda"
    assert dep.parameters["settings"]["data"]["holdout_fraction"] > 0  # each version is evaluated


SERVE_ON_INTERVAL = """
import json, sys
from prefect import serve
from prefect.types.entrypoint import EntrypointType
from refany3d.flows.train import train
deployment = train.to_deployment(
    name="scheduled", interval=float(sys.argv[2]), parameters=json.loads(sys.argv[1]),
    entrypoint_type=EntrypointType.MODULE_PATH,
)
serve(deployment, limit=1)
"""
INTERVAL_S = 30


def _finished_runs(client, deployment_id, after: float) -> list:
    """Final runs of the deployment that started after `after` (epoch seconds), oldest first."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    )
    runs = [r for r in runs if r.start_time and r.start_time.timestamp() > after and r.state.is_final()]
    return sorted(runs, key=lambda r: r.start_time)


def _next_run(client, deployment_id, after: float, served, log, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _finished_runs(client, deployment_id, after)
        if runs:
            assert runs[0].state.is_completed(), log.read_text()[-4000:]
            return runs[0]
        assert served.poll() is None, log.read_text()[-4000:]
        time.sleep(0.5)
    raise TimeoutError(f"no scheduled run finished after {timeout} s:\n{log.read_text()[-4000:]}")


def _artifact_keys(client, run) -> dict:
    for _ in range(30):
        found = {a.key: a for a in artifacts(client, run.id) if a.key}
        if any(k.endswith(("-promotion", "-dataset-unchanged")) for k in found):
            return found
        time.sleep(1)
    return found


@pytest.mark.slow
def test_interval_deployment_retrains_each_new_build_and_skips_when_none_landed(
    prefect_server, retrain_rows, tmp_path
):
    import sys

    builds, out = tmp_path / "builds", tmp_path / "retrain"
    v1 = land_build(builds, "b1", retrain_rows[:3], 1_000_000)
    params = {"dataset": str(builds), "out": str(out), "steps": 2, "settings": RETRAIN}
    env = {**prefect_server.env, "PREFECT_RUNNER_POLL_FREQUENCY": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "serve.log"
    served = subprocess.Popen(
        [sys.executable, "-c", SERVE_ON_INTERVAL, json.dumps(params), str(INTERVAL_S)],
        env=env, cwd=tmp_path, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        with prefect_server.client() as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    dep = client.read_deployment_by_name("train/scheduled")
                    break
                except Exception:
                    assert served.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(1)
            assert dep.schedules and dep.schedules[0].schedule.interval.total_seconds() == INTERVAL_S
            first = _next_run(client, dep.id, 0, served, log)
            assert "tiny-train-promotion" in _artifact_keys(client, first)
            assert json.loads((out / "promoted.json").read_text())["version"] == v1.version

            landed = time.time()  # a new build lands between two firings
            v2 = land_build(builds, "b2", retrain_rows)
            second = _next_run(client, dep.id, landed, served, log)
            arts = _artifact_keys(client, second)
            assert {"tiny-train-promotion", "tiny-train-evaluation", "tiny-train-loss-curve"} <= set(arts)
            decision = _decision(out, v2)
            _consistent(decision)
            assert decision["previous"]["version"] == v1.version and decision["warm_start"]
            promoted = json.loads((out / "promoted.json").read_text())["version"]
            assert promoted == (v2.version if decision["promote"] else v1.version)
            assert ("promoted" if decision["promote"] else "not promoted") in arts[
                "tiny-train-promotion"
            ].data

            third = _next_run(client, dep.id, second.end_time.timestamp(), served, log)  # no new build
            arts = _artifact_keys(client, third)
            assert "dataset unchanged" in arts["tiny-train-dataset-unchanged"].data
            assert v2.version in arts["tiny-train-dataset-unchanged"].data
            assert "tiny-train-promotion" not in arts
            assert (third.end_time - third.start_time).total_seconds() < INTERVAL_S
    finally:
        stop(served)
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted([v1.version, v2.version])


def test_train_flow_run_is_named_after_the_run(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client

    from refany3d.config import TrainSettings
    from refany3d.flows.train import train

    settings = TrainSettings(name="nightly-lora")
    state = train(
        dataset=str(tmp_path / "no-builds"), out=str(tmp_path / "o"), settings=settings, return_state=True
    )
    assert state.is_failed()  # no dataset here: the name is set before the body runs
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.name == "nightly-lora"
