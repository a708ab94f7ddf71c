"""Submits a build's (stage, batch) tasks as their parents finish, a bounded window of batches at a time.

A task is submitted only once its parents have finished, so no task-runner worker ever sits blocked
on an upstream future (with 2 workers that serialised the whole build: Prefect's thread runner
blocks on pending futures passed as inputs), and at most `window` batches are in flight, which
bounds the flow's memory. Tasks of serial stages (`StageSpec.serial`) wait for the one running.
"""

from __future__ import annotations

from typing import Any

from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import TaskRunner
from prefect.tasks import Task

from refany3d.config import BuildSettings
from refany3d.flows.tasks import task_for
from refany3d.stages.dag import STAGES, plan_inputs
from refany3d.stages.read_source import SourceBatch


class Scheduler:
    """`start(i, batch, keys)` a batch, then `next_finished_batch()` until every batch is sharded."""

    def __init__(self, runner: TaskRunner, tasks: dict[str, Task], settings: BuildSettings, build_id: str):
        self.runner, self.tasks, self.settings, self.build_id = runner, tasks, settings, build_id
        self.stages = list(tasks)
        self.children = {s: [c for c in tasks if s in plan_inputs(c, settings.until)] for s in tasks}
        self.pending: dict[PrefectFuture, tuple[int, str]] = {}
        self.batches: dict[int, tuple[SourceBatch, dict[str, str]]] = {}
        self.finished: dict[int, dict[str, PrefectFuture]] = {}
        self.waiting: list[tuple[int, str, Any]] = []  # serial-stage tasks not submitted yet

    def start(self, i: int, batch: SourceBatch, keys: dict[str, str]) -> None:
        """Submit batch `i`'s source task; `keys` are its stages' content keys."""
        self.batches[i] = (batch, keys)
        self.finished[i] = {}
        self._submit(i, "source", batch)

    def _submit(self, i: int, stage: str, inputs: Any) -> None:
        if STAGES[stage].serial and any(s == stage for _, s in self.pending.values()):
            self.waiting.append((i, stage, inputs))
            return
        batch, keys = self.batches[i]
        params = {
            "stage": stage,
            "batch_id": batch.batch_id,
            "inputs": inputs,
            "settings": self.settings,
            "build_id": self.build_id,
            "key": keys[stage],
            "source_url": batch.url,
        }
        task = task_for(self.tasks, stage, self.settings, keys[stage])
        self.pending[self.runner.submit(task, params)] = (i, stage)

    def _inputs(self, stage: str, done: dict[str, PrefectFuture]) -> list[PrefectFuture] | None:
        """The futures `stage` takes, once all are finished (shard: every earlier stage's)."""
        needed = (
            [s for s in self.stages if s != "shard"]
            if stage == "shard"
            else list(plan_inputs(stage, self.settings.until))
        )
        return [done[p] for p in needed] if all(p in done for p in needed) else None

    def next_finished_batch(self) -> tuple[int, dict[str, PrefectFuture]]:
        """Run tasks as their parents finish until one batch is sharded; its (index, futures)."""
        while True:
            future = next(as_completed(list(self.pending)))
            i, stage = self.pending.pop(future)
            waiting = next((w for w in self.waiting if w[1] == stage), None)
            if waiting is not None:
                self.waiting.remove(waiting)
                self._submit(*waiting)
            done = self.finished[i]
            done[stage] = future
            if stage == "shard":
                self.batches.pop(i)
                return i, self.finished.pop(i)
            for child in self.children[stage]:
                inputs = self._inputs(child, done)
                if inputs is not None:
                    self._submit(i, child, inputs)
