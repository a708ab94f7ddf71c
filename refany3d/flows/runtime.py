"""Where a build's Prefect machinery runs: result storage, task runner, the `gpu` concurrency limit."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from prefect.filesystems import RemoteFileSystem
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from refany3d.config import BuildSettings
from refany3d.flows.tasks import GPU_LIMIT
from refany3d.storage.store import join


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
