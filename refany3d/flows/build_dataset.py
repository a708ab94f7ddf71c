"""The `build-dataset` flow: the stage DAG of `stages/dag.py` as Prefect tasks over source batches.

Each stage is one task (`flows/tasks.py`), mapped over source batches (a batch is a row range of
one file), so the UI shows one task run per stage and batch (`detect-batch-<id>`). Results are
small (samples carry URIs) and persisted beside the output; each task is cached on its stage's
content key, so a rerun does exactly the work whose inputs changed and writes what a fresh build
would. At the end the flow removes the shard and reject tables it did not write (an earlier
build's), then writes the dataset card, `stats.json` and the Prefect artifacts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Failed, State

from refany3d.config import BuildSettings, SettingsError, to_dict
from refany3d.flows.artifacts import GALLERY_SAMPLES, BuildReport
from refany3d.flows.memory import GarbageCollector, limit_malloc_arenas
from refany3d.flows.runtime import (
    give_back_gpu_slots,
    refuse_relative,
    result_storage,
    set_switch_interval,
    task_runner,
)
from refany3d.flows.scheduler import Scheduler
from refany3d.flows.tasks import stage_task
from refany3d.preflight import preflight
from refany3d.records import Sample, StageResult, merge_samples
from refany3d.stages.dag import build_stages, plan_inputs, uses_truth
from refany3d.stages.keys import batch_keys, file_fingerprint, weights_fingerprints
from refany3d.stages.read_source import SourceBatch, plan_source
from refany3d.storage.card import ensure_build_id, write_card
from refany3d.storage.partitions import Partition, partition_key, write_partition_marker
from refany3d.storage.shards import DATA_DIR, list_tables, prune_outputs, write_rejects
from refany3d.storage.store import ArtifactStore, join
from refany3d.storage.versions import write_version


class _Outputs:
    """What the flow keeps of finished batches: the tables and markers the shard tasks wrote, and a
    few samples for the gallery. Stage results themselves are dropped once a batch is sharded, so
    the flow's memory does not grow with the dataset."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.markers: set[str] = set()
        self.gallery: list[Sample] = []

    def add_shard(self, key: str, result: StageResult) -> None:
        self.files.update(result.files)
        self.markers.add(f"{key}.json")
        self.gallery += result.kept[: max(0, GALLERY_SAMPLES - len(self.gallery))]

    def summary(self, report: BuildReport) -> dict[str, Any]:
        """What a partition's marker holds (`storage/partitions.py`)."""
        return {
            "files": sorted(self.files),
            "markers": sorted(self.markers),
            "counts": report.counts,
            "reasons": report.reasons,
            "gallery": [dataclasses.asdict(s) for s in self.gallery],
        }

    def add_partition(self, summary: dict[str, Any]) -> None:
        """Take in a finished partition's marker (the parent of a partitioned build)."""
        self.files.update(summary["files"])
        self.markers.update(summary["markers"])
        more = [Sample(**d) for d in summary["gallery"]]
        self.gallery += more[: max(0, GALLERY_SAMPLES - len(self.gallery))]


def _run_name() -> str:
    """The dataset's name; a partition's run adds the partition (`<name>-part-002-of-004`)."""
    from prefect.context import FlowRunContext

    params = FlowRunContext.get().parameters
    settings, part = params["settings"], params.get("partition")  # validated: the settings object
    return settings.dataset_name + (f"-{part.name}" if part else "")


@flow(name="build-dataset", flow_run_name=_run_name, log_prints=True)
def build_dataset(settings: BuildSettings, partition: Partition | None = None) -> dict[str, Any] | State:
    """Build the dataset of `settings` up to `settings.until`; returns the per-stage counts.

    With a `partition` (a child run of `build-dataset-partitioned`), build only its rows, commit
    its partition marker and leave the card, stats and version to the parent."""
    logger = get_run_logger()
    try:  # before anything is written: a relative output would vanish with the worker's temp dir
        refuse_relative(
            **{"storage.out": settings.storage.out, "storage.artifacts": settings.storage.artifacts}
        )
    except SettingsError as err:
        logger.error("%s", err)
        return Failed(message=str(err))
    file_rejects = preflight(settings)  # again: deployment runs do not come through the CLI
    limit_malloc_arenas()  # before the task runner starts its threads
    set_switch_interval(settings)
    build_id = ensure_build_id(settings.storage.out)
    batches = plan_source(settings)
    keys = plan_keys(settings, batches)
    if partition is not None:
        chosen = partition.select(batches)
        picked = set(chosen)
        keys = [k for b, k in zip(batches, keys) if b in picked]
        batches, file_rejects = chosen, []  # the parent counts and writes the file rejects
    name = settings.dataset_name + (f"-{partition.name}" if partition else "")
    report = BuildReport(name, build_stages(settings.until), len(batches))
    logger.info(
        "building %r%s into %s: %d batch(es) of <= %d rows, %d in flight, stages %s, %s runner",
        settings.dataset_name, f" ({partition.name}, rows {partition.start}-{partition.stop})" if partition else "",
        settings.storage.out, len(batches), settings.runtime.batch_size, settings.runtime.batches_in_flight,
        " -> ".join(report.stages), settings.runtime.runner,
    )  # fmt: skip
    outputs = run_batches(settings, batches, keys, build_id, report)
    if partition is not None:
        summary = outputs.summary(report)
        write_partition_marker(
            settings.storage.out, partition, partition_key([k["shard"] for k in keys]), summary
        )
        logger.info("%s: committed %d table(s)", partition.name, len(summary["files"]))
        return {"stats": report.stats(), "files": summary["files"], "flow_run_id": str(flow_run.id)}
    return finish_build(settings, report, outputs, file_rejects)


def plan_keys(settings: BuildSettings, batches: list[SourceBatch]) -> list[dict[str, str]]:
    """Each batch's stage content keys (`stages/keys.py`)."""
    file_hashes = {url: file_fingerprint(url) for url in {b.url for b in batches}}
    weights = weights_fingerprints(settings)
    return [batch_keys(settings, b.content_ref, file_hashes[b.url], weights) for b in batches]


def run_batches(
    settings: BuildSettings,
    batches: list[SourceBatch],
    keys: list[dict[str, str]],
    build_id: str,
    report: BuildReport,
) -> _Outputs:
    """Run every stage task of `batches`, a window of batches in flight; count them in `report`."""
    storage = result_storage(settings)
    tasks = {s: stage_task(s).with_options(result_storage=storage) for s in report.stages}
    outputs = _Outputs()
    todo = list(enumerate(batches))[::-1]
    try:
        with GarbageCollector() as garbage, task_runner(settings) as runner:
            scheduler = Scheduler(runner, tasks, settings, build_id)
            for _ in range(min(settings.runtime.batches_in_flight, len(todo))):
                i, batch = todo.pop()
                scheduler.start(i, batch, keys[i])
            for _ in batches:
                i, futures = scheduler.next_finished_batch()
                _count_batch(futures, batches[i], settings.until, report)
                outputs.add_shard(keys[i]["shard"], futures["shard"].result())
                garbage.after_batch()
                if todo:
                    j, batch = todo.pop()
                    scheduler.start(j, batch, keys[j])
    finally:
        give_back_gpu_slots()  # the slots this process kept for its GPU tasks' next turns
    return outputs


def finish_build(
    settings: BuildSettings, report: BuildReport, outputs: _Outputs, file_rejects: list
) -> dict[str, Any]:
    """Finalise a whole build: drop what it did not write, then the card, `stats.json`, the
    artifacts and, last, the dataset version."""
    logger = get_run_logger()
    out = settings.storage.out
    if file_rejects:
        report.add_file_rejects("source", file_rejects)
        outputs.files.add(write_rejects(out, "source-files", file_rejects))
    for stale in prune_outputs(out, outputs.files, outputs.markers):
        logger.info("removed %s: not part of this build (an earlier build's output)", stale)
    shards = list_tables(out, DATA_DIR)
    stats = report.stats()
    truth = uses_truth(settings)
    write_card(out, settings.dataset_name, stats, to_dict(settings), truth, settings.until, shards)
    store = ArtifactStore(settings.storage.artifacts or join(out, "artifacts"))
    report.finish(out, shards, outputs.gallery, store, truth)
    version = write_version(out, shards)  # last: a version exists only for a finished build
    logger.info("wrote %d shard(s), card and stats to %s (dataset %s)", len(shards), out, version.version)
    return {
        "stats": stats,
        "shards": shards,
        "out": out,
        "version": version.version,
        "flow_run_id": str(flow_run.id),
    }


def _count_batch(
    futures: dict[str, PrefectFuture], batch: SourceBatch, until: str, report: BuildReport
) -> None:
    """Feed one finished batch's stage results to the report."""
    results = {s: f.result() for s, f in futures.items()}
    for stage, result in results.items():
        if stage == "source":
            n_in = batch.stop - batch.start
        else:
            n_in = len(merge_samples([results[p] for p in plan_inputs(stage, until)]))
        report.add(stage, n_in, result)
