"""The `build-dataset` flow: the stage DAG of `stages/dag.py` as Prefect tasks over batches.

Each stage is one task named after it (`detect`, `segment`, ...), mapped over source batches (a
batch is a row range of one file), so the UI shows one task run per stage and batch
(`detect-batch-<id>`). Stage results are small (samples carry URIs) and are persisted next to the
output, and a task's cache key covers the stage, the settings sections it reads, its input samples,
the code version and the build id, so a rerun skips the work that already finished.

Failure policy: transient errors (I/O, timeouts) are retried with exponential backoff; CUDA out of
memory is retried in the task with half the model batch; anything else (or a transient error that
outlives the retries) makes the task run the stage one sample at a time, and a sample that still
fails is rejected with `stage_error` and the exception. Bad input ends as a reject, never as a
failed run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import hashlib
import json
import os
import posixpath
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.context import TaskRunContext
from prefect.filesystems import RemoteFileSystem
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import Task, exponential_backoff

from refany3d import __version__
from refany3d.config import BuildSettings, override, settings_hash, to_dict
from refany3d.flows.artifacts import GALLERY_SAMPLES, BuildReport, reason_counts
from refany3d.records import Rejection, Sample, StageResult
from refany3d.stages.context import StageContext
from refany3d.stages.dag import STAGES, ancestors, stage_function
from refany3d.stages.read_source import SourceBatch, plan_source
from refany3d.stages.shard import shard_names
from refany3d.storage.card import ensure_build_id, write_card
from refany3d.storage.shards import (
    DATA_DIR,
    REJECTS_DIR,
    list_tables,
    prune_tables,
    rejects_name,
    write_rejects,
)
from refany3d.storage.store import ArtifactStore, join

STAGE_ERROR = "stage_error"  # drop reason: the stage raised on this sample alone
GPU_STAGES = frozenset({"detect", "segment", "depth", "mesh", "pose"})
GPU_LIMIT = "gpu"  # Prefect global concurrency limit the GPU stages take slots from
RETRIES = 2
# Stages whose tasks run one at a time: a shard task holds a whole shard in memory (its rows and
# their Arrow table, ≈ 2 MB a sample), and two at once were the flow's largest peak.
SERIAL_STAGES = frozenset({"shard"})
_TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.EAGAIN,
    errno.EBUSY,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
}


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
    """Stage + settings sections it reads + input ids/URIs + code version + build id."""
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


# --------------------------------------------------------------------------- failure policy


def is_transient(err: BaseException) -> bool:
    """I/O hiccups worth retrying as they are (network, timeouts, busy devices)."""
    if isinstance(err, TimeoutError | ConnectionError | BrokenPipeError | InterruptedError):
        return True
    return isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA (or other accelerator) out of memory: retry with a smaller batch."""
    return type(err).__name__ == "OutOfMemoryError" or "out of memory" in str(err).lower()


def smaller_batch(settings: BuildSettings, stage: str) -> BuildSettings | None:
    """Settings with the stage's model batch halved, or None when it is already 1."""
    section = STAGES[stage].sections[0]
    size = getattr(getattr(settings, section), "batch_size", 1)
    return override(settings, **{f"{section}.batch_size": size // 2}) if size > 1 else None


def _free_accelerator_memory() -> None:
    torch = sys.modules.get("torch")  # only if a backend imported it: flows don't load models
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _call_stage(stage: str, inputs: Any, settings: BuildSettings, ctx: StageContext) -> StageResult:
    """Run the stage; on out-of-memory, again with half the model batch until it fits."""
    fn = stage_function(stage)
    while True:
        try:
            return fn(inputs, settings, ctx)
        except Exception as err:
            smaller = smaller_batch(settings, stage) if is_out_of_memory(err) else None
            if smaller is None:
                raise
            _free_accelerator_memory()
            get_run_logger().warning(
                "%s: out of memory at batch %d, retrying with %d",
                stage,
                getattr(getattr(settings, STAGES[stage].sections[0]), "batch_size", 1),
                getattr(getattr(smaller, STAGES[stage].sections[0]), "batch_size", 1),
            )
            settings = smaller


def _singles(inputs: Any) -> Iterator[tuple[Any, Sample]]:
    """(one-sample input, the sample it stands for) for each sample of a batch input."""
    if isinstance(inputs, SourceBatch):
        stem = posixpath.basename(inputs.url).removesuffix(".parquet")
        for row in range(inputs.start, inputs.stop):
            sid = f"{stem}-{row:06d}"
            stub = Sample(
                sample_id=sid, source_id=sid, source=inputs.source, source_ref=f"{inputs.url}#{row}"
            )
            yield SourceBatch(inputs.url, row, row + 1, inputs.source), stub
    else:
        for sample in inputs:
            yield [sample], sample


def _per_sample(stage: str, inputs: Any, settings: BuildSettings, ctx: StageContext) -> StageResult:
    """The stage one sample at a time; a sample it still fails on is rejected with the error."""
    result = StageResult()
    for single, sample in _singles(inputs):
        try:
            part = _call_stage(stage, single, settings, ctx)
        except Exception as err:
            detail = f"{type(err).__name__}: {err}"[:500]
            get_run_logger().warning("%s rejected %s: %s", stage, sample.sample_id, detail)
            result.dropped.append(
                Rejection(sample.sample_id, sample.source_id, stage, STAGE_ERROR, None, detail)
            )
            continue
        result.kept += part.kept
        result.dropped += part.dropped
    return result


def _last_attempt() -> bool:
    ctx = TaskRunContext.get()
    return ctx is None or ctx.task_run.run_count > ctx.task.retries


# --------------------------------------------------------------------------- memory
# A build's resident memory must not grow with the dataset (issue 5). Stage work is transient
# (images, depth maps, Parquet pages of a batch), but the allocators keep what was freed for reuse:
# glibc in an arena per thread (up to 8 per core; Prefect alone starts ~10 threads), Arrow's
# mimalloc pool per thread too. Their high-water marks only rise, and a long build with two tasks
# side by side sees more and higher overlaps than a short one. So the process uses few arenas and
# hands freed memory back after each task; cyclic garbage is collected after each batch.

_M_ARENA_MAX = -8  # glibc mallopt parameter: the most malloc arenas the process creates
MALLOC_ARENAS = 2


@cache
def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (has mallopt and malloc_trim); None elsewhere (musl, macOS)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


@cache
def _limit_malloc_arenas() -> None:
    """At most `MALLOC_ARENAS` glibc arenas from now on in this process (once per process)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS)


def _release_free_memory() -> None:
    """Return the memory Arrow's pool and glibc's heaps keep for reuse to the OS (a few ms)."""
    pa.default_memory_pool().release_unused()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _collect_garbage() -> None:
    """Free the reference cycles the stages left behind (trimesh meshes with their textures, ...).

    CPython runs a full collection only once the objects that survived earlier ones have grown by
    a quarter; with Prefect and the stage libraries loaded that took many batches, and their cyclic
    garbage (hundreds of MB) piled up until then, so the flow's peak RSS grew with the dataset.
    Once per finished batch bounds it to about a batch's worth (≈ 0.2 s, against seconds of work).
    """
    gc.collect()


def _gpu_slot(stage: str, settings: BuildSettings) -> contextlib.AbstractContextManager:
    """A slot of the `gpu` limit for GPU stages on a CUDA device; no throttling on CPU."""
    if stage in GPU_STAGES and settings.runtime.device.startswith("cuda"):
        from prefect.concurrency.sync import concurrency

        return concurrency(GPU_LIMIT, occupy=1)
    return contextlib.nullcontext()


def run_stage(stage: str, batch_id: str, inputs: Any, settings: BuildSettings, build_id: str) -> StageResult:
    """Run one stage on one batch; its rejects are written before the result is returned."""
    logger = get_run_logger()
    _limit_malloc_arenas()  # in a Dask worker process, too
    store = ArtifactStore(settings.storage.artifacts or join(settings.storage.out, "artifacts"))
    ctx = StageContext(store=store, seed=settings.source.seed)
    samples_in = inputs if isinstance(inputs, SourceBatch) else merge_parents(inputs)
    size = samples_in.stop - samples_in.start if isinstance(samples_in, SourceBatch) else len(samples_in)
    logger.info("%s: %d %s of batch %s", stage, size, "rows" if stage == "source" else "samples", batch_id)
    start = time.perf_counter()
    with _gpu_slot(stage, settings):
        try:
            result = _call_stage(stage, samples_in, settings, ctx)
        except Exception as err:
            if is_transient(err) and not _last_attempt():
                logger.warning("%s: transient %s, retrying: %s", stage, type(err).__name__, err)
                raise
            logger.warning(
                "%s failed on the whole batch (%s: %s); running it sample by sample",
                stage,
                type(err).__name__,
                err,
            )
            result = _per_sample(stage, samples_in, settings, ctx)
    write_rejects(settings.storage.out, result.dropped)
    _release_free_memory()
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
        cache_key_fn=_stage_cache_key,
        persist_result=True,
        # The result store would also keep each record in an in-memory LRU (1,000 records, ≈ 0.1 MB
        # each at 64 samples): the flow's memory grew with the build. Futures hold what is in flight.
        cache_result_in_memory=False,
        tags=["gpu"] if stage in GPU_STAGES else ["cpu"],
    )


# --------------------------------------------------------------------------- flow plumbing


def result_storage(settings: BuildSettings) -> Path | str:
    """Where task results live: beside the output (`OUT/.prefect-results`), so any worker that
    reaches the output reaches the cache, and deleting the output forgets it. A remote URL is
    saved as a `remote-file-system` block (Prefect wants remote result storage server-side)."""
    url = join(settings.storage.out, ".prefect-results")
    if "://" not in url or url.startswith("file://"):
        return Path(os.path.abspath(url.removeprefix("file://")))
    name = "refany3d-results-" + hashlib.sha256(url.encode()).hexdigest()[:12]
    RemoteFileSystem(basepath=url).save(name, overwrite=True)
    return f"remote-file-system/{name}"


def task_runner(settings: BuildSettings) -> TaskRunner:
    """Threads by default; `runtime.runner = dask`: a Dask cluster (local, or `dask_address`)."""
    if settings.runtime.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if settings.runtime.dask_address:
            return DaskTaskRunner(address=settings.runtime.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": settings.runtime.workers, "threads_per_worker": 1, "processes": True}
        )
    return ThreadPoolTaskRunner(max_workers=settings.runtime.workers)


def ensure_gpu_slots(settings: BuildSettings) -> None:
    """Create or resize the `gpu` global concurrency limit to `runtime.gpu_slots` (CUDA builds)."""
    if not settings.runtime.device.startswith("cuda"):
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, settings.runtime.gpu_slots)


def plan_inputs(stage: str, until: str) -> tuple[str, ...]:
    """The stages whose results feed `stage` in a build that stops after `until`."""
    if stage == "shard":
        return (next(s for s in reversed(ancestors(until)) if s != "shard"),)
    return STAGES[stage].parents


class _Scheduler:
    """Submits a (stage, batch) task only once its parents have finished, so no task-runner worker
    ever sits blocked on an upstream future (with 2 workers that serialised the whole build), and
    keeps at most `window` batches in flight. Tasks of `SERIAL_STAGES` wait for the one running."""

    def __init__(self, runner: TaskRunner, tasks: dict[str, Task], settings: BuildSettings, build_id: str):
        self.runner, self.tasks, self.settings, self.build_id = runner, tasks, settings, build_id
        self.children = {s: [c for c in tasks if s in plan_inputs(c, settings.until)] for s in tasks}
        self.pending: dict[PrefectFuture, tuple[int, str]] = {}
        self.finished: dict[int, dict[str, PrefectFuture]] = {}
        self.waiting: list[tuple[int, SourceBatch, str, Any]] = []  # serial-stage tasks not submitted yet

    def start(self, i: int, batch: SourceBatch) -> None:
        self.finished[i] = {}
        self._submit(i, batch, "source", batch)

    def _submit(self, i: int, batch: SourceBatch, stage: str, inputs: Any) -> None:
        if stage in SERIAL_STAGES and any(s == stage for _, s in self.pending.values()):
            self.waiting.append((i, batch, stage, inputs))
            return
        params = {
            "stage": stage,
            "batch_id": batch.batch_id,
            "inputs": inputs,
            "settings": self.settings,
            "build_id": self.build_id,
        }
        self.pending[self.runner.submit(self.tasks[stage], params)] = (i, stage)

    def next_finished_batch(self, batches: list[SourceBatch]) -> tuple[int, dict[str, PrefectFuture]]:
        """Run tasks as their parents finish until one batch is sharded; its (index, futures)."""
        while True:
            future = next(as_completed(list(self.pending)))
            i, stage = self.pending.pop(future)
            waiting = next((w for w in self.waiting if w[2] == stage), None)
            if waiting is not None:
                self.waiting.remove(waiting)
                self._submit(*waiting)
            done = self.finished[i]
            done[stage] = future
            if stage == "shard":
                return i, self.finished.pop(i)
            for child in self.children[stage]:
                parents = plan_inputs(child, self.settings.until)
                if all(p in done for p in parents):
                    self._submit(i, batches[i], child, [done[p] for p in parents])


class _Outputs:
    """What the flow keeps of finished batches: file names of shards and reject tables, and a few
    samples for the gallery. Stage results themselves are dropped once a batch is sharded, so the
    flow's memory does not grow with the dataset."""

    def __init__(self, shard_size: int) -> None:
        self.shard_size = shard_size
        self.shards: set[str] = set()
        self.rejects: set[str] = set()
        self.gallery: list[Sample] = []

    def add(self, stage: str, result: StageResult) -> None:
        if result.dropped:
            self.rejects.add(rejects_name(result.dropped))
        if stage == "shard":
            self.shards.update(shard_names(result.kept, self.shard_size))
            self.gallery += result.kept[: max(0, GALLERY_SAMPLES - len(self.gallery))]


@flow(name="build-dataset", flow_run_name="{settings.dataset_name}", log_prints=True)
def build_dataset(settings: BuildSettings) -> dict[str, Any]:
    """Build the dataset of `settings` up to `settings.until`; returns the per-stage counts."""
    logger = get_run_logger()
    _limit_malloc_arenas()  # before the task runner starts its threads
    build_id = ensure_build_id(settings.storage.out)
    ensure_gpu_slots(settings)
    batches = plan_source(settings)
    storage = result_storage(settings)
    stages = [s for s in ancestors(settings.until) if s != "shard"] + ["shard"]
    tasks = {s: stage_task(s).with_options(result_storage=storage) for s in stages}
    window = settings.runtime.batches_in_flight
    logger.info(
        "building %r into %s: %d batch(es) of <= %d rows, %d in flight, stages %s, %s runner",
        settings.dataset_name, settings.storage.out, len(batches), settings.runtime.batch_size, window,
        " -> ".join(stages), settings.runtime.runner,
    )  # fmt: skip
    report = BuildReport(settings.dataset_name, stages, len(batches))
    outputs = _Outputs(settings.storage.shard_size)
    todo = list(enumerate(batches))[::-1]
    with task_runner(settings) as runner:
        scheduler = _Scheduler(runner, tasks, settings, build_id)
        for _ in range(min(window, len(todo))):
            scheduler.start(*todo.pop())
        for _ in batches:
            i, futures = scheduler.next_finished_batch(batches)
            _count_batch(i, futures, batches, settings.until, report, outputs)
            _collect_garbage()
            if todo:
                scheduler.start(*todo.pop())
    out = settings.storage.out
    for subdir, keep in ((DATA_DIR, outputs.shards), (REJECTS_DIR, outputs.rejects)):
        for stale in prune_tables(out, subdir, keep):
            logger.info("removed %s: not part of this build (an earlier build's output)", stale)
    shards = list_tables(out)
    stats = report.stats()
    write_card(
        out, settings.dataset_name, stats, to_dict(settings), settings.uses_truth, settings.until, shards
    )
    store = ArtifactStore(settings.storage.artifacts or join(out, "artifacts"))
    report.finish(out, shards, outputs.gallery, store, settings.uses_truth)
    logger.info("wrote %d shard(s), card and stats to %s", len(shards), out)
    return {"stats": stats, "shards": shards, "out": out, "flow_run_id": str(flow_run.id)}


def _count_batch(
    i: int,
    futures: dict[str, PrefectFuture],
    batches: list[SourceBatch],
    until: str,
    report: BuildReport,
    outputs: _Outputs,
) -> None:
    """Feed one finished batch's stage results to the report and the kept outputs."""
    results = {s: f.result() for s, f in futures.items()}
    for stage, result in results.items():
        if stage == "source":
            n_in = batches[i].stop - batches[i].start
        else:
            n_in = len(merge_parents([results[p] for p in plan_inputs(stage, until)]))
        report.add(stage, n_in, result)
        outputs.add(stage, result)
