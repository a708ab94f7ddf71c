"""The `build-dataset-partitioned` flow: one build spread over the workers of a pool.

Subflows run in their parent's process, so to use many machines the parent starts one flow run of
the build deployment (`build-dataset/cpu` or `/gpu`) per partition, a disjoint range of whole
source batches (`storage/partitions.py`), with `run_deployment(..., timeout=0)`; any worker of the
pool picks each up. It waits for all of them (`wait_for_flow_run`), starts a partition again when
its run failed or crashed (a dead worker's run is marked crashed by the zombie automation that
`refany3d deploy` creates), and reports each partition's runs in a table artifact. The children
share the output, its build id and so its cache records: a partition started again reuses every
stage its earlier run finished. Last, the parent finalises the dataset as a single build does:
one card, one `stats.json`, and the dataset version, written last.

The parent only waits; it must not hold a slot its children need. Run it from the CLI (`refany3d
build --partitions N`), or as the deployment `build-dataset-partitioned/control` on its own pool,
`control`, whose worker never runs a build (docs/operating.md, "Many workers").
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.schemas.objects import FlowRun
from prefect.deployments.flow_runs import arun_deployment
from prefect.flow_runs import wait_for_flow_run
from prefect.states import Failed, State
from prefect.utilities.asyncutils import run_coro_as_sync

from refany3d.config import BuildSettings, SettingsError, to_dict
from refany3d.flows.artifacts import BuildReport, artifact_key
from refany3d.flows.build_dataset import _Outputs, finish_build, plan_keys
from refany3d.flows.runtime import refuse_relative
from refany3d.preflight import preflight
from refany3d.stages.dag import build_stages
from refany3d.stages.read_source import plan_source
from refany3d.storage.card import ensure_build_id
from refany3d.storage.partitions import Partition, partition_key, plan_partitions, read_partition_marker

RESTARTS = 2  # a partition's runs after its first one fails or crashes


def child_deployment(settings: BuildSettings) -> str:
    """The build deployment that runs the partitions: on the gpu pool for a CUDA build."""
    return "build-dataset/gpu" if settings.runtime.device.startswith("cuda") else "build-dataset/cpu"


@flow(name="build-dataset-partitioned", flow_run_name="{settings.dataset_name}", log_prints=True)
def build_dataset_partitioned(
    settings: BuildSettings, partitions: int = 2, deployment: str = "", restarts: int = RESTARTS
) -> dict[str, Any] | State:
    """Build `settings` as `partitions` child runs of `deployment` (default: `child_deployment`)."""
    logger = get_run_logger()
    out = settings.storage.out
    try:
        refuse_relative(**{"storage.out": out, "storage.artifacts": settings.storage.artifacts})
        if "://" not in out and not out.startswith("/"):  # children run in other working directories
            raise SettingsError(f"storage.out: {out!r} is relative; partitions need an absolute path or URL")
    except SettingsError as err:
        logger.error("%s", err)
        return Failed(message=str(err))
    file_rejects = preflight(settings)
    ensure_build_id(out)  # before any child: they share it, and with it their cache records
    batches = plan_source(settings)  # the synthetic source is generated here, once
    keys = dict(zip(batches, plan_keys(settings, batches)))
    parts = plan_partitions(batches, partitions)
    expected = {p: partition_key([keys[b]["shard"] for b in p.select(batches)]) for p in parts}
    deployment = deployment or child_deployment(settings)
    logger.info("building %r into %s: %d partition(s) of %d batch(es) on %s",
                settings.dataset_name, out, len(parts), len(batches), deployment)  # fmt: skip
    runs = run_coro_as_sync(_run_partitions(settings, parts, expected, deployment, restarts, logger))
    summaries = {p: read_partition_marker(out, p, expected[p]) for p in parts}
    _publish_partitions(settings.dataset_name, parts, runs, summaries)
    missing = [p.name for p in parts if summaries[p] is None]
    if missing:
        message = (
            f"{len(missing)} partition(s) did not finish after {restarts} restart(s): {', '.join(missing)}"
        )
        logger.error("%s", message)
        return Failed(message=message)
    report = BuildReport(settings.dataset_name, build_stages(settings.until), len(batches))
    outputs = _Outputs()
    for p in parts:
        report.add_counts(summaries[p]["counts"], summaries[p]["reasons"])
        outputs.add_partition(summaries[p])
    result = finish_build(settings, report, outputs, file_rejects)
    return {**result, "partitions": {p.name: [str(r.id) for r in runs[p]] for p in parts}}


async def _run_partitions(
    settings: BuildSettings,
    parts: list[Partition],
    expected: dict[Partition, str],
    deployment: str,
    restarts: int,
    logger,
) -> dict[Partition, list[FlowRun]]:
    """Start every partition that has no valid marker, wait for all, start failed ones again."""
    params = to_dict(settings)
    out = settings.storage.out

    async def one(p: Partition) -> list[FlowRun]:
        runs: list[FlowRun] = []
        if await asyncio.to_thread(read_partition_marker, out, p, expected[p]) is not None:
            logger.info("%s: committed by an earlier run; not started again", p.name)
            return runs
        for attempt in range(restarts + 1):
            child = await arun_deployment(
                deployment,
                parameters={"settings": params, "partition": asdict(p)},
                timeout=0,
                flow_run_name=f"{settings.dataset_name}-{p.name}",
                tags=["refany3d", "partition"],
            )
            done = await wait_for_flow_run(child.id, timeout=None)
            runs.append(done)
            committed = await asyncio.to_thread(read_partition_marker, out, p, expected[p])
            if done.state.is_completed() and committed is not None:
                break
            logger.warning("%s: run %s ended %s (%s)%s", p.name, done.name, done.state.name,
                           done.state.message or "no message",
                           "; starting it again" if attempt < restarts else "; no restarts left")  # fmt: skip
        return runs

    found = await asyncio.gather(*(one(p) for p in parts))
    return dict(zip(parts, found))


def _publish_partitions(
    name: str, parts: list[Partition], runs: dict[Partition, list[FlowRun]], summaries: dict
) -> None:
    """One row per partition: its rows, its runs' states in order, whether it committed."""
    rows = [
        {
            "partition": p.name,
            "rows": f"{p.start}-{p.stop}",
            "runs": " -> ".join(f"{r.state.name} ({str(r.id)[:8]})" for r in runs[p])
            or "none (committed earlier)",
            "committed": "yes" if summaries[p] is not None else "no",
            "kept": summaries[p]["counts"]["shard"]["kept"] if summaries[p] else "-",
        }
        for p in parts
    ]
    create_table_artifact(rows, key=artifact_key(name, "partitions"), description=f"{name}: partitions")
