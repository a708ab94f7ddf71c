"""End-to-end build benchmark on this machine: the synthetic source through Prefect up to `--until`.

Measures, each case in a fresh process against one local `prefect server`:
  * samples per minute with 1 and 2 Dask worker processes (and the default thread runner);
  * peak RSS of the flow process at a small and a large number of samples;
  * Prefect overhead: the same stages on the same batches in a plain loop (no Prefect), so
    overhead per sample = (flow wall - plain wall) / samples, against the plain stage time.

    .venv/bin/python bench/build_bench.py --small 57 --large 570 --until depth --batch 32 \
        --json bench/results/build_bench.json

A "sample" is one view after `split` (a source row is a pair: two samples); the quality filter
drops some rows, so 57 / 570 rows give ≈ 100 / ≈ 1,000 samples (the issue's sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _settings(source: str, out: str, until: str, runner: str, workers: int, batch: int):
    from refany3d.config import BuildSettings, override

    return override(
        BuildSettings(),
        **{
            "name": "bench",
            "until": until,
            "source.kind": "synthetic",
            "source.data_files": source,
            "storage.out": out,
            "runtime.runner": "thread" if runner == "plain" else runner,
            "runtime.workers": workers,
            "runtime.batch_size": batch,
        },
    )


def child(args: argparse.Namespace) -> None:
    """One measured run in this process; prints a JSON line."""
    settings = _settings(args.source, args.out, args.until, args.runner, args.workers, args.batch)
    start = time.perf_counter()
    if args.runner == "plain":
        samples = _plain(settings)
    else:
        from refany3d.flows.build_dataset import build_dataset

        samples = build_dataset(settings)["stats"]["shard"]["in"]
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": round(wall, 2), "samples": samples, "peak_rss_mb": round(_peak_rss_mb(), 1)}))


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not `ru_maxrss`: Linux carries the parent's high-water
    mark over fork and exec, so each case read at least the bench process's RSS (878 MB here, from
    generating the source), which hid the small cases' real peaks."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plain(settings) -> int:
    """The flow's stage calls over the same batches, sequentially, without Prefect."""
    from refany3d.records import merge_samples
    from refany3d.stages.context import StageContext
    from refany3d.stages.dag import build_stages, plan_inputs, stage_function
    from refany3d.stages.read_source import plan_source
    from refany3d.storage.shards import write_rejects
    from refany3d.storage.store import ArtifactStore, join

    ctx = StageContext(
        store=ArtifactStore(join(settings.storage.out, "artifacts")), seed=settings.source.seed
    )
    stages = build_stages(settings.until)
    samples = 0
    for batch in plan_source(settings):
        results = {}
        for stage in stages:
            parents = plan_inputs(stage, settings.until)
            inputs = batch if stage == "source" else merge_samples([results[p] for p in parents])
            if stage == "shard":
                samples += len(inputs)
            results[stage] = stage_function(stage)(inputs, settings, ctx)
            write_rejects(settings.storage.out, f"plain-{batch.batch_id}-{stage}", results[stage].dropped)
    return samples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_case(env: dict, source: str, until: str, runner: str, workers: int, batch: int, work: Path) -> dict:
    out = tempfile.mkdtemp(dir=work, prefix=f"{runner}{workers}-")
    cmd = [sys.executable, __file__, "--child", "--source", source, "--out", out, "--until", until,
           "--runner", runner, "--workers", str(workers), "--batch", str(batch)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(runner=runner, workers=workers, samples_per_min=round(60 * row["samples"] / row["wall_s"], 1))
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true")
    p.add_argument("--source", default="")
    p.add_argument("--out", default="")
    p.add_argument("--runner", default="thread")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--until", default="depth")
    p.add_argument("--small", type=int, default=57, help="source rows of the small case (2 samples a row)")
    p.add_argument("--large", type=int, default=570, help="source rows of the large case")
    p.add_argument("--json", default="")
    p.add_argument("--data", default="", help="keep the synthetic sources here (reused); default: a temp dir")
    args = p.parse_args()
    if args.child:
        return child(args)

    from refany3d.synthetic import ensure_synthetic

    work = Path(tempfile.mkdtemp(prefix="refany3d-bench-"))
    t0 = time.perf_counter()
    data = Path(args.data) if args.data else work
    small = ensure_synthetic(str(data / "small"), args.small, 0)
    large = ensure_synthetic(str(data / "large"), args.large, 1)
    gen_s = time.perf_counter() - t0
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(work / "prefect"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
               PYOPENGL_PLATFORM="egl")  # fmt: skip
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        rows = {
            "plain_small": _run_case(env, small, args.until, "plain", 1, args.batch, work),
            "thread2_small": _run_case(env, small, args.until, "thread", 2, args.batch, work),
            "dask1_small": _run_case(env, small, args.until, "dask", 1, args.batch, work),
            "dask2_small": _run_case(env, small, args.until, "dask", 2, args.batch, work),
            "plain_large": _run_case(env, large, args.until, "plain", 1, args.batch, work),
            "thread2_large": _run_case(env, large, args.until, "thread", 2, args.batch, work),
        }
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    report = summarise(rows, args, gen_s)
    print(json.dumps(report["summary"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def summarise(rows: dict, args: argparse.Namespace, gen_s: float) -> dict:
    def overhead(size: str) -> dict:
        plain, flow = rows[f"plain_{size}"], rows[f"thread2_{size}"]
        per_sample = (flow["wall_s"] - plain["wall_s"]) / flow["samples"]
        stage = plain["wall_s"] / plain["samples"]
        return {"stage_s_per_sample": round(stage, 4), "prefect_overhead_s_per_sample": round(per_sample, 4),
                "overhead_pct_of_stage_time": round(100 * per_sample / stage, 1)}  # fmt: skip

    summary = {
        "samples_per_min": {
            k: rows[k]["samples_per_min"] for k in ("dask1_small", "dask2_small", "thread2_small")
        },
        "peak_rss_mb": {
            "small": rows["thread2_small"]["peak_rss_mb"],
            "large": rows["thread2_large"]["peak_rss_mb"],
        },
        "samples": {"small": rows["thread2_small"]["samples"], "large": rows["thread2_large"]["samples"]},
        "overhead_small": overhead("small"),
        "overhead_large": overhead("large"),
    }
    summary["rss_growth_pct"] = round(
        100 * (summary["peak_rss_mb"]["large"] / summary["peak_rss_mb"]["small"] - 1), 1
    )
    return {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "until": args.until,
        "batch_size": args.batch,
        "synthetic_generation_s": round(gen_s, 1),
        "cases": rows,
        "summary": summary,
    }


if __name__ == "__main__":
    main()
