"""The `build-dataset` flow: the stage DAG of `stages/dag.py` as Prefect tasks over source batches.

Each stage is one task (`flows/tasks.py`), mapped over source batches (a batch is a row range of
one file), so the UI shows one task run per stage and batch (`detect-batch-<id>`). Results are
small (samples carry URIs) and persisted beside the output; each task is cached on its stage's
content key, so a rerun does exactly the work whose inputs changed and writes what a fresh build
would. At the end the flow removes the shard and reject tables it did not write (an earlier
build's), then writes the dataset card, `stats.json` and the Prefect artifacts.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Failed, State

from refany3d.config import BuildSettings, SettingsError, to_dict
from refany3d.flows.artifacts import GALLERY_SAMPLES, BuildReport
from refany3d.flows.memory import collect_garbage, limit_malloc_arenas
from refany3d.flows.runtime import refuse_relative, result_storage, task_runner
from refany3d.flows.scheduler import Scheduler
from refany3d.flows.tasks import stage_task
from refany3d.preflight import preflight
from refany3d.records import Sample, StageResult, merge_samples
from refany3d.stages.dag import build_stages, plan_inputs, uses_truth
from refany3d.stages.keys import batch_keys, file_fingerprint, weights_fingerprints
from refany3d.stages.read_source import SourceBatch, plan_source
from refany3d.storage.card import ensure_build_id, write_card
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


@flow(name="build-dataset", flow_run_name="{settings.dataset_name}", log_prints=True)
def build_dataset(settings: BuildSettings) -> dict[str, Any] | State:
    """Build the dataset of `settings` up to `settings.until`; returns the per-stage counts."""
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
    build_id = ensure_build_id(settings.storage.out)
    batches = plan_source(settings)
    storage = result_storage(settings)
    stages = build_stages(settings.until)
    tasks = {s: stage_task(s).with_options(result_storage=storage) for s in stages}
    window = settings.runtime.batches_in_flight
    logger.info(
        "building %r into %s: %d batch(es) of <= %d rows, %d in flight, stages %s, %s runner",
        settings.dataset_name, settings.storage.out, len(batches), settings.runtime.batch_size, window,
        " -> ".join(stages), settings.runtime.runner,
    )  # fmt: skip
    report = BuildReport(settings.dataset_name, stages, len(batches))
    report.add_file_rejects("source", file_rejects)
    outputs = _Outputs()
    if file_rejects:
        outputs.files.add(write_rejects(settings.storage.out, "source-files", file_rejects))
    file_hashes = {url: file_fingerprint(url) for url in {b.url for b in batches}}
    weights = weights_fingerprints(settings)
    keys = [batch_keys(settings, b.content_ref, file_hashes[b.url], weights) for b in batches]
    todo = list(enumerate(batches))[::-1]
    with task_runner(settings) as runner:
        scheduler = Scheduler(runner, tasks, settings, build_id)
        for _ in range(min(window, len(todo))):
            i, batch = todo.pop()
            scheduler.start(i, batch, keys[i])
        for _ in batches:
            i, futures = scheduler.next_finished_batch()
            _count_batch(futures, batches[i], settings.until, report)
            outputs.add_shard(keys[i]["shard"], futures["shard"].result())
            collect_garbage()
            if todo:
                j, batch = todo.pop()
                scheduler.start(j, batch, keys[j])
    out = settings.storage.out
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
