"""The `build-dataset` flow: the stage DAG of `stages/dag.py` as Prefect tasks over batches.

Each stage is one task, mapped over source batches (a batch is a row range of one file), so the
UI shows one task run per stage and batch. Stage results are small (samples carry URIs) and are
persisted, and a task's cache key covers the stage, the settings sections it reads, its input
samples and the code version, so a rerun skips the work that already finished.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.futures import PrefectFuture, wait

from refany3d import __version__
from refany3d.config import BuildSettings, settings_hash, to_dict
from refany3d.records import Sample, StageResult
from refany3d.stages.context import StageContext
from refany3d.stages.dag import STAGES, ancestors, stage_function
from refany3d.storage.card import ensure_build_id, write_card
from refany3d.storage.shards import list_tables, write_rejects
from refany3d.storage.store import ArtifactStore, join
from refany3d.stages.read_source import SourceBatch, plan_source


def merge_parents(results: list[StageResult]) -> list[Sample]:
    """Samples kept by every parent, their artifacts, metrics and fields merged (DAG joins)."""
    if len(results) == 1:
        return results[0].kept
    common = set.intersection(*({s.sample_id for s in r.kept} for r in results))
    merged: dict[str, Sample] = {}
    for r in results:
        for s in r.kept:
            if s.sample_id not in common:
                continue
            if s.sample_id not in merged:
                merged[s.sample_id] = s.replace()
                continue
            base = merged[s.sample_id]
            base.artifacts.update(s.artifacts)
            base.metrics.update(s.metrics)
            base.backends.update(s.backends)
            for name in ("box", "pose", "intrinsics", "focal_px", "mesh_scale"):
                if getattr(base, name) is None:
                    setattr(base, name, getattr(s, name))
    return [merged[k] for k in sorted(merged)]


def _stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Stage + settings sections it reads + input ids/URIs + code version + output presence."""
    settings: BuildSettings = parameters["settings"]
    stage = parameters["stage"]
    sections = {name: settings_hash(getattr(settings, name)) for name in STAGES[stage].sections}
    inputs = parameters["inputs"]
    if isinstance(inputs, SourceBatch):
        ident = repr(inputs)
    else:
        ident = json.dumps(
            [[(s.sample_id, sorted(s.artifacts.items())) for s in r.kept] for r in inputs], default=str
        )
    extra = {"until": settings.until} if stage == "shard" else {}
    # The build id lives in OUT: a deleted or new output directory means recompute, not reuse.
    blob = json.dumps([stage, sections, ident, __version__, extra, parameters["build_id"]], default=str)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


@task(
    task_run_name="{stage}-batch-{batch_id}",
    retries=2,
    retry_delay_seconds=[2, 10],
    cache_key_fn=_stage_cache_key,
    persist_result=True,
)
def run_stage(stage: str, batch_id: str, inputs: Any, settings: BuildSettings, build_id: str) -> StageResult:
    """Run one stage on one batch; its rejects are written before the result is returned."""
    store = ArtifactStore(settings.storage.artifacts or join(settings.storage.out, "artifacts"))
    ctx = StageContext(store=store, seed=settings.source.seed)
    fn = stage_function(stage)
    samples_in = inputs if isinstance(inputs, SourceBatch) else merge_parents(inputs)
    result = fn(samples_in, settings, ctx)
    write_rejects(settings.storage.out, result.dropped)
    get_run_logger().info(
        "%s on batch %s: %d kept, %d dropped", stage, batch_id, len(result.kept), len(result.dropped)
    )
    return result


def tally(stage_results: dict[str, list[StageResult]], inputs: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per-stage counters: in, kept, dropped, dropped_<reason>."""
    stats: dict[str, dict[str, int]] = {}
    for stage, results in stage_results.items():
        reasons = Counter(r.reason for res in results for r in res.dropped)
        kept = sum(len(res.kept) for res in results)
        dropped = sum(reasons.values())
        stats[stage] = {"in": inputs.get(stage, kept + dropped), "kept": kept, "dropped": dropped}
        stats[stage].update({f"dropped_{k}": v for k, v in sorted(reasons.items())})
    return stats


@flow(name="build-dataset", flow_run_name="{settings.dataset_name}", log_prints=True)
def build_dataset(settings: BuildSettings) -> dict[str, Any]:
    """Build the dataset of `settings` up to `settings.until`; returns the per-stage counts."""
    logger = get_run_logger()
    build_id = ensure_build_id(settings.storage.out)
    batches = plan_source(settings)
    logger.info("building %r: %d batch(es), stages %s", settings.dataset_name, len(batches), ancestors(settings.until))
    stages = [s for s in ancestors(settings.until) if s != "shard"]
    futures: dict[str, list[PrefectFuture]] = {}
    for stage in stages + ["shard"]:
        parents = STAGES[stage].parents if stage != "shard" else (stages[-1],)
        futures[stage] = [
            run_stage.submit(
                stage,
                b.batch_id,
                b if stage == "source" else [futures[p][i] for p in parents],
                settings,
                build_id,
            )
            for i, b in enumerate(batches)
        ]
    wait([f for fs in futures.values() for f in fs])
    results = {stage: [f.result() for f in fs] for stage, fs in futures.items()}
    inputs = {"source": sum(b.stop - b.start for b in batches)}
    for stage in stages[1:] + ["shard"]:
        parents = STAGES[stage].parents if stage != "shard" else (stages[-1],)
        inputs[stage] = sum(len(merge_parents([results[p][i] for p in parents])) for i in range(len(batches)))
    stats = tally(results, inputs)
    shards = list_tables(settings.storage.out)
    write_card(settings.storage.out, settings.dataset_name, stats, to_dict(settings), settings.uses_truth, settings.until, shards)
    logger.info("wrote %d shard(s) to %s", len(shards), settings.storage.out)
    return {"stats": stats, "shards": shards, "out": settings.storage.out}
