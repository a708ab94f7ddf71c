"""Failure policy of the build's stage tasks.

Transient errors (I/O, timeouts) are retried by Prefect with exponential backoff (the task raises
them again until its last attempt); CUDA out of memory is retried in the task with half the model
batch; anything else (or a transient error that outlives the retries) makes the task run the stage
one sample at a time, and a sample that still fails is rejected with `stage_error` and the
exception. Bad input ends as a reject, never as a failed run. A `stage_error` whose exception is
transient or out of memory is a transient drop (`Rejection.transient`): the next run tries it
again. The `shard` stage handles its rows one by one itself and never takes the per-sample fallback.
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import get_run_logger
from prefect.context import TaskRunContext

from refany3d.config import BuildSettings, override
from refany3d.records import (
    STAGE_ERROR,
    Rejection,
    StageResult,
    error_detail,
    is_out_of_memory,
    is_transient,
)
from refany3d.stages.context import StageContext
from refany3d.stages.dag import STAGES, stage_function
from refany3d.stages.read_source import SourceBatch

RETRIES = 2

__all__ = ["RETRIES", "is_out_of_memory", "is_transient", "run_with_policy", "smaller_batch"]


def _batch_size(settings: BuildSettings, stage: str) -> int:
    """The model batch of the stage's own section (its first one); 1 for stages with none
    (`source` reads no settings section)."""
    sections = STAGES[stage].sections
    return getattr(getattr(settings, sections[0]), "batch_size", 1) if sections else 1


def smaller_batch(settings: BuildSettings, stage: str) -> BuildSettings | None:
    """Settings with the stage's model batch halved, or None when it is already 1."""
    size = _batch_size(settings, stage)
    if size <= 1:
        return None
    return override(settings, **{f"{STAGES[stage].sections[0]}.batch_size": size // 2})


def _free_accelerator_memory() -> None:
    torch = sys.modules.get("torch")  # only if a backend imported it: flows don't load models
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def call_stage(stage: str, inputs: Any, settings: BuildSettings, ctx: StageContext) -> StageResult:
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
                _batch_size(settings, stage),
                _batch_size(smaller, stage),
            )
            settings = smaller


def _singles(inputs: Any) -> list[tuple[Any, Any]]:
    """(one-sample input, the sample it stands for) for each sample of a batch input."""
    if isinstance(inputs, SourceBatch):
        return [(row, inputs.row_sample(row.start)) for row in inputs.rows()]
    return [([sample], sample) for sample in inputs]


def per_sample(stage: str, inputs: Any, settings: BuildSettings, ctx: StageContext) -> StageResult:
    """The stage one sample at a time; a sample it still fails on is rejected with the error."""
    result = StageResult()
    for single, sample in _singles(inputs):
        try:
            part = call_stage(stage, single, settings, ctx)
        except Exception as err:
            detail = error_detail(err, 500)
            get_run_logger().warning("%s rejected %s: %s", stage, sample.sample_id, detail)
            transient = is_transient(err) or is_out_of_memory(err)
            result.dropped.append(
                Rejection(sample.sample_id, sample.source_id, stage, STAGE_ERROR, None, detail, transient)
            )
            continue
        result.kept += part.kept
        result.dropped += part.dropped
    return result


def last_attempt() -> bool:
    """True in the task's last run (no Prefect retry left), or outside a task."""
    ctx = TaskRunContext.get()
    return ctx is None or ctx.task_run.run_count > ctx.task.retries


def run_with_policy(stage: str, inputs: Any, settings: BuildSettings, ctx: StageContext) -> StageResult:
    """`call_stage` under the policy above."""
    try:
        return call_stage(stage, inputs, settings, ctx)
    except Exception as err:
        logger = get_run_logger()
        if is_transient(err) and not last_attempt():
            logger.warning("%s: transient %s, retrying: %s", stage, type(err).__name__, err)
            raise
        if stage == "shard":  # its rows are handled one by one already: what is left is the run's
            raise
        logger.warning(
            "%s failed on the whole batch (%s: %s); running it sample by sample",
            stage,
            type(err).__name__,
            err,
        )
        return per_sample(stage, inputs, settings, ctx)
