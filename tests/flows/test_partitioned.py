"""Many workers for real: a Prefect server on PostgreSQL, a moto S3 server and two process workers
of the `cpu` pool (one slot each, like GPU machines). `refany3d build --partitions 4 --out
s3://...` writes, byte for byte, the shards of a single-process build into a local directory, even
when one worker is killed (SIGKILL, its flow run with it) while its partition runs: the zombie
automation marks that run Crashed and the parent starts the partition again on the other worker,
which reuses the stages the dead run had finished. `train --data s3://...` reads every sample of
those shards. The deployment `build-dataset-partitioned` runs on its own pool, so with one build
worker left it still finishes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.deployments import run_deployment

from refany3d.storage.fs import url_to_fs
from refany3d.testing.pgserver import free_port, postgres_server
from tests.flows._runs import artifacts, shard_bytes, task_runs, wait_flow_run
from tests.flows.conftest import BIN, OFFLINE, PrefectServer, stop, wait_http
from tests.s200k import Row, write_subjects200k

pytestmark = pytest.mark.slow
ROWS = 24
ZOMBIE_AFTER_S = 45  # the automation's heartbeat window (heartbeats every 30 s, Prefect's minimum)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    """Postgres, a Prefect server on it, `refany3d deploy --pool cpu`, two cpu workers and one
    control worker; the source (24 Subjects200K rows) and a local single-process reference build."""
    home = tmp_path_factory.mktemp("cluster")
    with postgres_server() as database, contextlib.ExitStack() as stack:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({**OFFLINE, **s3.env})
        env.update(
            {
                "PREFECT_HOME": str(home),
                "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                "PREFECT_API_DATABASE_CONNECTION_URL": database,
                "PREFECT_SERVER_EVENTS_EXPIRED_BUCKET_BUFFER": "PT5S",  # evaluate the zombie window promptly
                "PREFECT_WORKER_QUERY_SECONDS": "1",
                "PREFECT_WORKER_PREFETCH_SECONDS": "1",
                "PREFECT_LOGGING_EXTRA_LOGGERS": "refany3d",
                "PYOPENGL_PLATFORM": "egl",
                "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            }
        )
        server = PrefectServer(env["PREFECT_API_URL"], env, home / "server.log")
        proc = server.start(str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                            log=server.log)  # fmt: skip
        stack.callback(stop, proc)
        wait_http(f"{server.url}/health", 180, proc, server.log)
        deploy = subprocess.run([str(BIN / "refany3d"), "deploy", "--pool", "cpu", "--zombie-after",
                                 str(ZOMBIE_AFTER_S)], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert deploy.returncode == 0, deploy.stderr[-3000:]
        workers = {}
        for name, pool in (("cpu-a", "cpu"), ("cpu-b", "cpu"), ("control", "control")):
            workers[name] = server.start(str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
                                         "--limit", "1", "--name", name, log=home / f"{name}.log", cwd=home)  # fmt: skip
            stack.callback(stop, workers[name])
        (home / "src").mkdir()
        write_subjects200k(home / "src" / "rows.parquet", [Row(seed=i) for i in range(ROWS)])
        files = str(home / "src" / "*.parquet")
        ref = subprocess.run(_build(files, str(home / "ref")), env=env, capture_output=True, text=True)
        assert ref.returncode == 0, ref.stderr[-3000:]
        yield {"server": server, "workers": workers, "files": files, "ref": home / "ref", "home": home,
               "deploy": deploy.stdout}  # fmt: skip


def _build(files: str, out: str, *extra: str) -> list[str]:
    return [str(BIN / "refany3d"), "build", "--data-files", files, "--until", "split", "--out", out,
            "--set", "runtime.batch_size=1", "--name", "many-workers", *extra]  # fmt: skip


def s3_bytes(out: str, sub: str = "data") -> dict[str, bytes]:
    fs, root = url_to_fs(out)
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in sorted(fs.glob(f"{root}/{sub}/*.parquet"))}


def _kill_a_running_partition(server: PrefectServer, workers: dict, deadline: float) -> str:
    """SIGKILL the worker running a partition that has finished some tasks, and that flow run's
    process: a machine that dies. Returns the killed worker's name."""
    with server.client() as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["partition"]))
            )
            for run in runs:
                if run.state.is_running() and run.infrastructure_pid:
                    pid = int(run.infrastructure_pid.rsplit(":", 1)[-1])
                    done = [
                        t for t in task_runs(client, run.id, timeout=0) if t.state and t.state.is_completed()
                    ]
                    if len(done) < 3:
                        continue
                    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                    name = next(n for n, w in workers.items() if w.pid in (pid, ppid))
                    os.killpg(workers[name].pid, signal.SIGKILL)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(os.getpgid(pid), signal.SIGKILL)
                    workers[name].wait(10)
                    return name
            time.sleep(0.2)
    raise TimeoutError("no partition was running with finished tasks")


@pytest.fixture(scope="module")
def partitioned(cluster, s3):
    """`build --partitions 4 --out s3://...` with one worker killed mid-partition: its output URL,
    the parent's exit code and output, the killed worker's name."""
    out = s3.bucket() + "/builds/many"
    parent = subprocess.Popen(_build(cluster["files"], out, "--partitions", "4"), env=cluster["server"].env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    killed = _kill_a_running_partition(cluster["server"], cluster["workers"], time.monotonic() + 240)
    stdout, stderr = parent.communicate(timeout=420)
    return {"out": out, "code": parent.returncode, "stdout": stdout, "stderr": stderr, "killed": killed}


def test_partitioned_build_into_s3_survives_a_killed_worker_and_equals_a_local_build(cluster, partitioned):
    server, out, stdout, stderr = cluster["server"], *(partitioned[k] for k in ("out", "stdout", "stderr"))
    assert partitioned["code"] == 0, f"killed {partitioned['killed']}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr and "CancelledError" not in stderr

    assert s3_bytes(out) == shard_bytes(cluster["ref"]) != {}
    assert s3_bytes(out, "rejects") == {
        p.name: p.read_bytes() for p in (cluster["ref"] / "rejects").glob("*.parquet")
    }
    fs, root = url_to_fs(out)
    ref_stats = json.loads((cluster["ref"] / "stats.json").read_text())
    stats = json.loads(fs.cat_file(f"{root}/stats.json"))
    assert stats["stages"] == ref_stats["stages"] and stats["shards"] == ref_stats["shards"]
    assert json.loads(fs.cat_file(f"{root}/version.json")) == json.loads(
        (cluster["ref"] / "version.json").read_text()
    )
    assert fs.cat_file(f"{root}/README.md").decode().count("## Yield per stage") == 1

    run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", stdout).group(1)
    with server.client() as client:
        table = [a for a in artifacts(client, run_id) if a.key == "many-workers-partitions"][-1]
        rows = json.loads(table.data)
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["partition"]))
        )
        restarted = [c for c in children if c.state.is_crashed()]
        assert len(restarted) == 1 and "heartbeat" in restarted[0].state.message  # the killed worker's run
        same = restarted[0].parameters["partition"]
        again = next(c for c in children if c.parameters["partition"] == same and c.state.is_completed())
        assert again.name == restarted[0].name == f"many-workers-part-{same['index'] + 1:03d}-of-004"
        states = {t.name: t.state.name for t in task_runs(client, again.id, expect=1)}
    assert [r["committed"] for r in rows] == ["yes"] * 4
    assert sum("Crashed" in r["runs"] for r in rows) == 1
    assert "Cached" in states.values()  # the restarted partition reused what the dead run finished
    assert {c.work_pool_name for c in children} == {"cpu"}


def test_train_reads_every_sample_of_the_partitioned_build_from_s3(cluster, partitioned, s3, caplog, capsys):
    """`refany3d train --data s3://...` on that build's bucket: it indexes and decodes every sample
    of the shards the partitions committed. The build stops at `split` (point maps come from the
    render stage, minutes here), so each sample is skipped for its missing point map after its
    image decoded, and after a whole pass the run stops in one line, having written nothing."""
    from refany3d.cli import main
    from tests.train.test_cli_train import TINY

    tables = sorted((cluster["ref"] / "data").glob("*.parquet"))
    ids = {i for t in tables for i in pq.read_table(t, columns=["sample_id"])["sample_id"].to_pylist()}
    runs = s3.bucket()
    args = ["train", "--data", partitioned["out"], "--out", f"{runs}/runs/a", f"--set=data.cache={runs}/cache",
            "--steps", "1", *TINY]  # fmt: skip
    caplog.set_level(logging.INFO, logger="refany3d.train")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"refany3d train: error: data.shards: no readable sample in a whole pass over {partitioned['out']!r} (skipped_image_missing {len(ids) + 1})" in err  # fmt: skip
    assert f"; {len(ids)} samples, 1 process(es)" in caplog.text
    skips = [r.args for r in caplog.records if r.msg == "skipped %s (%s) %s"]
    assert {a[0] for a in skips} == ids and {a[1:] for a in skips} == {("image_missing", "point_map")}
    fs, root = url_to_fs(runs)
    assert fs.find(root) == []  # neither a checkpoint nor a cache entry of a run that had nothing to train on


def test_partitioned_deployment_runs_on_the_control_pool_and_holds_no_build_slot(cluster, s3):
    """One build worker left, one slot: a parent that took it would wait forever for its children."""
    server, workers = cluster["server"], cluster["workers"]
    alive = [n for n in ("cpu-a", "cpu-b") if workers[n].poll() is None]
    for name in alive[1:]:
        stop(workers[name])
    assert "build-dataset-partitioned/control" in cluster["deploy"]
    out = s3.bucket() + "/builds/deployed"
    params = {"settings": {"name": "deployed", "until": "split", "source": {"kind": "subjects200k",
              "data_files": cluster["files"], "limit": 8}, "storage": {"out": out}, "runtime": {"batch_size": 1}},
              "partitions": 2}  # fmt: skip
    with server.client():
        run = run_deployment("build-dataset-partitioned/control", parameters=params, timeout=0)
    with server.client() as client:
        done = wait_flow_run(client, run.id, timeout=240)
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["partition"]))
        )
    log = (cluster["home"] / "control.log").read_text()[-3000:]
    assert done.state.is_completed(), log
    assert done.work_pool_name == "control"
    mine = [c for c in children if c.parent_task_run_id and c.name.startswith("deployed-")]
    assert len(mine) == 2 and {c.work_pool_name for c in mine} == {"cpu"}
    written = s3_bytes(out)  # the first 8 rows' batches: the reference build's shards of those rows
    assert len(written) == 8 and set(written) <= set(shard_bytes(cluster["ref"]))


def test_partitions_on_a_deployment_that_is_not_registered_exit_2_in_one_line(cluster, tmp_path):
    done = subprocess.run(_build(cluster["files"], str(tmp_path / "out"), "--partitions", "2", "--deployment",
                                 "build-dataset/nowhere"), env=cluster["server"].env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith(
        "refany3d build: error: --deployment: 'build-dataset/nowhere' is not registered"
    ), done.stderr
    assert done.stderr.count("\n") == 1
