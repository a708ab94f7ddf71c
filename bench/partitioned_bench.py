"""Partitioned builds on this machine: samples per minute with 1, 2 and 4 Prefect process workers.

A Prefect server on a throwaway PostgreSQL (refany3d/testing/pgserver.py, Debian's `postgresql`), `refany3d
deploy --pool cpu`, K workers of the `cpu` pool with one slot each, and `refany3d build
--partitions P` (the CLI process is the parent) over the synthetic source with the `truth`
backends up to `--until`. Each case builds into a fresh output; a single-process `refany3d build`
of the same source and server is the baseline (and the shards are checked equal to it).

    .venv/bin/python bench/partitioned_bench.py --rows 114 --until depth --batch 8 \
        --json bench/results/partitioned.json

Reported per case: wall time of the parent, samples per minute, and the parent's overhead per
partition = (K x wall - sum of the children's running time) / P: worker time that is not a
partition's flow running (queueing, the worker's polling, process start and imports, the parent's
planning and finalisation). Scaling efficiency = speed-up over the baseline / K.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from uuid import UUID

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def _wait_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "data").glob("*.parquet"))}


def _build(env: dict, source: str, out: Path, args, *extra: str) -> float:
    cmd = [str(BIN / "refany3d"), "build", "--source", "synthetic", "--data-files", source, "--until", args.until,
           "--out", str(out), "--set", f"runtime.batch_size={args.batch}", "--name", "bench", *extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return wall, done.stdout


def _children(env: dict, parent_stdout: str) -> list:
    """The partition runs the parent of `parent_stdout` started (its table artifact names them)."""
    import re

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", parent_stdout).group(1)
    with (
        temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        parent = client.read_flow_run(UUID(run_id))
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        flt = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id]))
        return client.read_flow_runs(flow_run_filter=flt)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--rows", type=int, default=114, help="synthetic source rows (two samples a row, before filters)"
    )
    p.add_argument("--until", default="depth")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--partitions", type=int, default=0, help="partitions per case (default: 4 per case)")
    p.add_argument("--json", default="")
    args = p.parse_args()

    from refany3d.synthetic import ensure_synthetic
    from refany3d.testing.pgserver import free_port, postgres_server

    work = Path(tempfile.mkdtemp(prefix="refany3d-pbench-"))
    source = ensure_synthetic(str(work / "source"), args.rows, 0)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(work / "prefect"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING", PYOPENGL_PLATFORM="egl",
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1")  # fmt: skip
    procs: list[subprocess.Popen] = []
    cases = {}
    try:
        with postgres_server() as database:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = database
            procs.append(subprocess.Popen([str(BIN / "prefect"), "server", "start", "--port", str(port)], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))  # fmt: skip
            _wait_http(f"{env['PREFECT_API_URL']}/health", 240)
            subprocess.run(
                [str(BIN / "refany3d"), "deploy", "--pool", "cpu"], env=env, check=True, capture_output=True
            )
            wall, _ = _build(env, source, work / "single", args)
            stats = json.loads((work / "single" / "stats.json").read_text())
            samples = stats["stages"]["shard"]["in"]
            cases["single"] = {"workers": 0, "partitions": 0, "wall_s": round(wall, 1),
                               "samples_per_min": round(60 * samples / wall, 1)}  # fmt: skip
            print(json.dumps(cases["single"]), flush=True)
            workers: list[subprocess.Popen] = []
            for k in (int(x) for x in args.workers.split(",")):
                while len(workers) < k:
                    log = open(work / f"worker-{len(workers)}.log", "wb")  # noqa: SIM115
                    workers.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--limit",
                                                     "1", "--type", "process"], env=env, stdout=log, stderr=log,
                                                    cwd=work, start_new_session=True))  # fmt: skip
                procs[1:] = workers
                time.sleep(5)  # the new workers poll
                parts = args.partitions or 4
                out = work / f"k{k}"
                wall, stdout = _build(env, source, out, args, "--partitions", str(parts))
                assert _shards(out) == _shards(work / "single"), (
                    "partitioned shards differ from the single build"
                )
                kids = _children(env, stdout)
                running = sum(c.total_run_time.total_seconds() for c in kids)
                cases[f"workers_{k}"] = {
                    "workers": k,
                    "partitions": parts,
                    "wall_s": round(wall, 1),
                    "samples_per_min": round(60 * samples / wall, 1),
                    "children_running_s": round(running, 1),
                    "overhead_s_per_partition": round((k * wall - running) / parts, 1),
                }
                print(json.dumps(cases[f"workers_{k}"]), flush=True)
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, 15)
                proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(work, ignore_errors=True)
    one = cases.get("workers_1", cases["single"])
    for case in cases.values():
        if case["workers"]:
            case["speedup_vs_single"] = round(case["samples_per_min"] / cases["single"]["samples_per_min"], 2)
            case["efficiency_vs_1_worker"] = round(
                case["samples_per_min"] / (case["workers"] * one["samples_per_min"]), 2
            )
    report = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_at_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "until": args.until,
        "batch_size": args.batch,
        "source_rows": args.rows,
        "samples": samples,
        "cases": cases,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
