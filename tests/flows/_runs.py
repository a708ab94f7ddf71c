"""Reading back what a build left: flow/task runs and artifacts from the API, shard rows from disk."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pyarrow.parquet as pq
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)


def task_runs(client, flow_run_id: str | UUID, expect: int = 0, timeout: float = 60.0) -> list:
    """Task runs of a flow run; waits until at least `expect` are recorded (events are async)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(str(flow_run_id))]))
        )
        done = [r for r in runs if r.state is not None and r.state.is_final()]
        if len(done) >= expect or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def artifacts(client, flow_run_id: str | UUID) -> list:
    """Every artifact version a flow run created."""
    flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(flow_run_id))]))
    return client.read_artifacts(artifact_filter=flt)


def wait_flow_run(client, flow_run_id: str | UUID, timeout: float) -> Any:
    """The flow run once it reaches a final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(UUID(str(flow_run_id)))
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(1.0)
    raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout} s (state {run.state})")


def shard_bytes(out: Path) -> dict[str, bytes]:
    """Shard file name -> bytes, for byte-level comparisons of two builds."""
    return {p.name: p.read_bytes() for p in sorted((out / "data").glob("*.parquet"))}


def shard_ids(out: Path) -> list[str]:
    """Sample ids of every shard row (duplicates kept, so callers can check for them)."""
    ids: list[str] = []
    for p in sorted((out / "data").glob("*.parquet")):
        ids += pq.read_table(p, columns=["sample_id"]).column("sample_id").to_pylist()
    return ids


def rejects(out: Path) -> list[dict]:
    rows: list[dict] = []
    for p in sorted((out / "rejects").glob("*.parquet")):
        rows += pq.read_table(p).to_pylist()
    return rows
