"""The build's Prefect tasks: one per stage, named after it, one run per source batch.

Each task is cached on its stage's content key (`stages/keys.py`: the stage, the settings it reads,
the weights it loads, its inputs' keys, its code), the build id (the output directory's identity)
and the URL of the batch's data file (results point into it: `source_ref`), so a rerun skips
exactly the work whose inputs did not change. The `shard` task also writes the batch's rejects and
then a completion marker; a shard task whose marker or files are gone is submitted with a cache
refresh, so deleting a shard re-runs the shard task alone (the intent of Prefect's
`_project_cache_key` idiom, without a key that changes once the output exists).

Transient is not a result: a task whose result has transient drops (`Rejection.transient`), or
whose inputs had them anywhere upstream (`StageResult.partial`), does not write its cache record
(its transaction's `write_on_commit` is turned off), so the next run does that work again, and
every task below it too, and ends with what a fresh build writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import cache
from typing import Any

from prefect import get_run_logger, task
from prefect.tasks import Task, exponential_backoff
from prefect.transactions import get_transaction

from refany3d.config import BuildSettings
from refany3d.flows.artifacts import reason_counts
from refany3d.flows.memory import limit_malloc_arenas, release_free_memory
from refany3d.flows.policy import RETRIES, run_with_policy
from refany3d.flows.runtime import gpu_turns, set_switch_interval
from refany3d.records import StageResult, merge_samples
from refany3d.stages.context import StageContext
from refany3d.stages.dag import STAGES
from refany3d.stages.read_source import SourceBatch
from refany3d.storage.shards import marker_complete, write_marker, write_rejects
from refany3d.storage.store import ArtifactStore, join


def _task_key(context: Any, parameters: dict[str, Any]) -> str:
    blob = f"{parameters['key']}\n{parameters['build_id']}\n{parameters['source_url']}"
    return f"{parameters['stage']}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def task_for(tasks: dict[str, Task], stage: str, settings: BuildSettings, key: str) -> Task:
    """The task to submit for `stage` on a batch of content key `key`: a shard task whose files
    are gone (its marker, or a table it lists, was deleted) runs again and replaces its cached
    result under the same key, so the rerun after it is cached again."""
    if stage == "shard" and not marker_complete(settings.storage.out, key):
        return tasks[stage].with_options(refresh_cache=True)
    return tasks[stage]


def _gpu_turns(stage: str, settings: BuildSettings) -> Callable[[], AbstractContextManager]:
    """Turns on a slot of this machine's GPU limit for GPU stages on a CUDA device (the stage takes
    one per forward pass, `StageContext.device`); no throttling on CPU."""
    if STAGES[stage].gpu and settings.runtime.device.startswith("cuda"):
        return gpu_turns(settings)
    return contextlib.nullcontext


def run_stage(
    stage: str,
    batch_id: str,
    inputs: Any,
    settings: BuildSettings,
    build_id: str,
    key: str,
    source_url: str,
) -> StageResult:
    """Run one stage on one batch. `inputs`: the `SourceBatch` (source), the parents' results
    (other stages), or every earlier stage's result of the batch, the last one its parent (shard:
    it writes their rejects too). `build_id` and `source_url` are only part of the cache key."""
    logger = get_run_logger()
    limit_malloc_arenas()  # in a Dask worker process, too
    set_switch_interval(settings)
    store = ArtifactStore(settings.storage.artifacts or join(settings.storage.out, "artifacts"))
    ctx = StageContext(store=store, seed=settings.source.seed, key=key, device=_gpu_turns(stage, settings))
    if isinstance(inputs, SourceBatch):
        samples_in: Any = inputs
        size = inputs.stop - inputs.start
        partial = False
    else:
        samples_in = inputs[-1].kept if stage == "shard" else merge_samples(inputs)
        size = len(samples_in)
        partial = any(r.transient for r in inputs)
    logger.info("%s: %d %s of batch %s", stage, size, "rows" if stage == "source" else "samples", batch_id)
    start = time.perf_counter()
    result = run_with_policy(stage, samples_in, settings, ctx)
    if stage == "shard":
        dropped = [r for earlier in inputs for r in earlier.dropped] + result.dropped
        name = write_rejects(settings.storage.out, key, dropped)
        result.files += [name] if name else []
        write_marker(settings.storage.out, key, result.files)
    result.partial = partial
    if result.transient:
        _do_not_cache(stage, batch_id, result)
    release_free_memory()
    reasons = reason_counts(result.dropped)
    logger.info(
        "%s: %d kept, %d dropped%s in %.2f s",
        stage,
        len(result.kept),
        len(result.dropped),
        f" ({', '.join(f'{k}: {v}' for k, v in reasons.items())})" if reasons else "",
        time.perf_counter() - start,
    )
    return result


def _do_not_cache(stage: str, batch_id: str, result: StageResult) -> None:
    """Keep this task run's result out of the cache: it is returned to the flow as usual, but
    its record is not written under the cache key, so the next run computes it again."""
    transaction = get_transaction()
    if transaction is not None:
        transaction.write_on_commit = False
    n = sum(r.transient for r in result.dropped)
    why = f"{n} transient drop(s)" if n else "inputs with transient drops"
    get_run_logger().warning("%s: batch %s not cached (%s); the next run retries it", stage, batch_id, why)


@cache
def stage_task(stage: str) -> Task:
    """The Prefect task of one stage: named after it, one run per batch, retried, cached."""
    return task(
        run_stage,
        name=stage,
        task_run_name=f"{stage}-batch-{{batch_id}}",
        retries=RETRIES,
        retry_delay_seconds=exponential_backoff(backoff_factor=2),
        retry_jitter_factor=0.5,
        cache_key_fn=_task_key,
        persist_result=True,
        # The result store would also keep each record in an in-memory LRU (1,000 records, ≈ 0.1 MB
        # each at 64 samples): the flow's memory grew with the build. Futures hold what is in flight.
        cache_result_in_memory=False,
        # No tags: Prefect takes a slot of a `tag:<tag>` concurrency limit for each tag of each task
        # run as it starts, one more server call per task, which waited 1.8-2.3 s under a build's
        # load (bench/GPU_BUILD_RUN.md, run 6). The GPU's limit is the machine's (`gpu_turns`).
        tags=[],
    )
