"""Deployments on a real Prefect server: `refany3d deploy`, a process worker, a run triggered with
`prefect deployment run`, and the run as the UI shows it (headless Chromium)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from tests.flows._runs import artifacts, shard_ids, wait_flow_run
from tests.flows.conftest import BIN, stop

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
SCREENSHOT_DIR = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def deployed_run(prefect_server, synthetic_source, tmp_path_factory):
    """`refany3d deploy`, a `prefect worker` on the cpu pool, one triggered build, finished."""
    work = tmp_path_factory.mktemp("worker")
    out = work / "out"
    deploy = subprocess.run(
        [str(BIN / "refany3d"), "deploy"], env=prefect_server.env, capture_output=True, text=True, timeout=180
    )
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    worker = prefect_server.start(
        str(BIN / "prefect"),
        "worker",
        "start",
        "--pool",
        "cpu",
        "--type",
        "process",
        log=work / "worker.log",
        cwd=work,
    )
    try:
        params = {
            "settings": {
                "name": "worker-demo",
                "until": "depth",
                "source": {"kind": "synthetic", "data_files": synthetic_source},
                "storage": {"out": str(out)},
                "runtime": {"batch_size": 2},
            }
        }
        trigger = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "build-dataset/cpu", "--params", json.dumps(params)],
            env=prefect_server.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert trigger.returncode == 0, trigger.stdout + trigger.stderr
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", trigger.stdout).group(1)
        with prefect_server.client() as client:
            run = wait_flow_run(client, run_id, timeout=300)
        yield {"deploy": deploy.stdout, "run": run, "out": out, "worker_log": work / "worker.log"}
    finally:
        stop(worker)


def test_deploy_registers_build_dataset_on_both_pools(prefect_server, deployed_run):
    assert "build-dataset/cpu" in deployed_run["deploy"] and "build-dataset/gpu" in deployed_run["deploy"]
    assert re.search(r"train/gpu\s+pool gpu\s+registered", deployed_run["deploy"])
    with prefect_server.client() as client:
        cpu = client.read_deployment_by_name("build-dataset/cpu")
        gpu = client.read_deployment_by_name("build-dataset/gpu")
    assert (cpu.work_pool_name, gpu.work_pool_name) == ("cpu", "gpu")
    assert cpu.entrypoint == "refany3d.flows.build_dataset.build_dataset"
    assert gpu.parameters["settings"]["runtime"]["device"] == "cuda"
    assert gpu.parameters["settings"]["mesher"]["compile"] is True  # the gpu profile
    assert cpu.parameters["settings"]["mesher"]["compile"] is False


def test_worker_runs_triggered_build_to_shards_and_card(prefect_server, deployed_run):
    run, out = deployed_run["run"], deployed_run["out"]
    assert run.state.is_completed(), deployed_run["worker_log"].read_text()[-4000:]
    assert run.name == "worker-demo"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["until"] == "depth" and list(stats["stages"])[-1] == "shard"
    ids = shard_ids(out)
    assert len(ids) == len(set(ids)) == stats["stages"]["shard"]["kept"]
    with prefect_server.client() as client:
        keys = {a.key for a in artifacts(client, run.id)}
    assert {"worker-demo-yield", "worker-demo-gallery", "worker-demo-shards"} <= keys


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed (scripts/setup.sh)")
def test_ui_flow_run_page_shows_yield_table(prefect_server, deployed_run, tmp_path):
    from playwright.sync_api import sync_playwright

    run = deployed_run["run"]
    with prefect_server.client() as client:
        arts = sorted(artifacts(client, run.id), key=lambda a: a.created)
    final = [a for a in arts if a.key == "worker-demo-yield"][-1]
    gallery = [a for a in arts if a.key == "worker-demo-gallery"][-1]
    assert "(finished)" in final.description
    shots = SCREENSHOT_DIR if os.environ.get("REFANY3D_UPDATE_SCREENSHOTS") else tmp_path
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{prefect_server.ui}/runs/flow-run/{run.id}", wait_until="domcontentloaded")
            page.get_by_text("worker-demo").first.wait_for(timeout=60_000)
            page.locator("li.p-tab", has_text="Artifacts").click()
            page.get_by_text("worker-demo-yield").first.wait_for(timeout=30_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shots / "prefect-ui-flow-run-artifacts.png"), full_page=True)
            page.goto(f"{prefect_server.ui}/artifacts/artifact/{final.id}", wait_until="domcontentloaded")
            page.get_by_text("dropped by reason").first.wait_for(timeout=30_000)
            page.wait_for_timeout(1000)
            body = page.inner_text("body")
            page.screenshot(path=str(shots / "prefect-ui-yield-table.png"), full_page=True)
            page.goto(f"{prefect_server.ui}/artifacts/artifact/{gallery.id}", wait_until="domcontentloaded")
            page.get_by_text("sample gallery").first.wait_for(timeout=30_000)
            page.wait_for_timeout(1000)
            widths = page.eval_on_selector_all(
                "img[src^='data:image']", "els => els.map(e => e.naturalWidth)"
            )
            page.screenshot(path=str(shots / "prefect-ui-gallery.png"), full_page=True)
        finally:
            browser.close()
    for stage in ("source", "quality", "split", "detect", "segment", "depth", "shard"):
        assert stage in body
    assert widths and min(widths) > 0  # thumbnails embedded as data URIs render in the UI


def test_serve_runs_triggered_build_in_process(prefect_server, s200k_source, tmp_path):
    served = prefect_server.start(str(BIN / "refany3d"), "serve", log=tmp_path / "serve.log", cwd=tmp_path)
    try:
        with prefect_server.client() as client:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    client.read_deployment_by_name("build-dataset/local")
                    break
                except ObjectNotFound:
                    assert served.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                    time.sleep(1)
            settings = {"until": "split", "source": {"kind": "subjects200k", "data_files": s200k_source}}
            settings["storage"] = {"out": str(tmp_path / "out")}
            run = run_deployment(
                "build-dataset/local", parameters={"settings": settings}, timeout=0, client=client
            )
            run = wait_flow_run(client, run.id, timeout=180)
    finally:
        stop(served)
    assert run.state.is_completed(), (tmp_path / "serve.log").read_text()[-3000:]
    assert len(shard_ids(tmp_path / "out")) == 12


def test_deploy_resolves_default_paths_and_a_run_refuses_a_relative_out(prefect_server, deployed_run):
    with prefect_server.client() as client:
        build = client.read_deployment_by_name("build-dataset/cpu").parameters
        train = client.read_deployment_by_name("train/gpu").parameters
    for path in (build["settings"]["storage"]["out"], train["dataset"], train["out"]):
        assert os.path.isabs(path), path
    assert train["dataset"] == build["settings"]["storage"]["out"]
    assert f"out {build['settings']['storage']['out']}" in deployed_run["deploy"]
    params = {"settings": {"name": "relative-demo", "storage": {"out": "rel/out"}}}
    with prefect_server.client() as client:
        run = run_deployment("build-dataset/cpu", parameters=params, timeout=0, client=client)
        run = wait_flow_run(client, run.id, timeout=180)
    assert run.state.is_failed()
    message = run.state.message
    assert "\n" not in message and "storage.out: 'rel/out' is relative" in message
    assert "Traceback" not in deployed_run["worker_log"].read_text()
    assert not list(deployed_run["worker_log"].parent.rglob("rel"))  # nothing written anywhere


def test_redeploy_keeps_schedules_unless_cron_none(prefect_server, deployed_run):
    def deploy(*args: str) -> str:
        done = subprocess.run(
            [str(BIN / "refany3d"), "deploy", "--pool", "cpu", *args],
            env=prefect_server.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    def crons() -> list[str]:
        with prefect_server.client() as client:
            found = client.read_deployment_by_name("build-dataset/cpu")
            return [s.schedule.cron for s in client.read_deployment_schedules(found.id)]

    assert "cron '0 3 * * *'" in deploy("--build-cron", "0 3 * * *")
    assert crons() == ["0 3 * * *"]
    printed = deploy("--set", "runtime.batch_size=3")  # a plain redeploy, to change a setting
    assert crons() == ["0 3 * * *"] and "cron '0 3 * * *'" in printed
    with prefect_server.client() as client:
        params = client.read_deployment_by_name("build-dataset/cpu").parameters
    assert params["settings"]["runtime"]["batch_size"] == 3
    assert "no schedule" in deploy("--build-cron", "none")
    assert crons() == []
    bad = subprocess.run(
        [str(BIN / "refany3d"), "deploy", "--pool", "cpu", "--build-cron", "every day"],
        env=prefect_server.env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr and "'every day' is not a cron" in bad.stderr


def test_deploy_train_set_configures_the_train_deployment(prefect_server, deployed_run):
    done = subprocess.run(
        [str(BIN / "refany3d"), "deploy", "--train-set", "optim.lr=0.25", "--train-set", "checkpoint.keep=5"],
        env=prefect_server.env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with prefect_server.client() as client:
        params = client.read_deployment_by_name("train/gpu").parameters
    assert params["settings"]["optim"]["lr"] == 0.25 and params["settings"]["checkpoint"]["keep"] == 5
    assert params["settings"]["data"]["holdout_fraction"] == 0.05  # the deployment's default kept
    assert params["settings"]["runtime"]["device"] == "cuda" and os.path.isabs(params["out"])
    bad = subprocess.run(
        [str(BIN / "refany3d"), "deploy", "--train-set", "optim.nope=1"],
        env=prefect_server.env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_deploy_registers_train_cpu_and_a_cpu_worker_trains_with_it(prefect_server, deployed_run, tmp_path):
    from tests.train._shards import rendered_rows, write_dataset

    assert re.search(r"train/cpu\s+pool cpu\s+registered, .*device cpu", deployed_run["deploy"])
    with prefect_server.client() as client:
        dep = client.read_deployment_by_name("train/cpu")
    assert (dep.work_pool_name, dep.entrypoint) == ("cpu", "refany3d.flows.train.train")
    assert dep.parameters["settings"]["runtime"] == {**dep.parameters["settings"]["runtime"], "device": "cpu"}
    build = write_dataset(tmp_path / "builds" / "b1", rendered_rows(2))
    (build / "stats.json").write_text("{}")
    settings = {
        "name": "cpu-train",
        "data": {"resolution": 32, "condition_resolution": 32, "holdout_fraction": 0.5},
        "model": {"num_views": 2, "attention": "grouped", "gradient_checkpointing": False},
        "checkpoint": {"every": 1, "sample_every": 1, "sample_steps": 1},
        "retrain": {"eval_samples": 1},
    }
    params = {
        "dataset": str(build.parent),
        "out": str(tmp_path / "retrain"),
        "steps": 1,
        "settings": settings,
    }
    with prefect_server.client() as client:
        run = run_deployment("train/cpu", parameters=params, timeout=0, client=client)
        run = wait_flow_run(client, run.id, timeout=300)
    assert run.state.is_completed(), deployed_run["worker_log"].read_text()[-4000:]
    assert run.name == "cpu-train"
    pointer = json.loads((tmp_path / "retrain" / "promoted.json").read_text())
    summary = json.loads((Path(pointer["checkpoint"]).parents[1] / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["steps"] == 1
