"""Where a build's Prefect machinery runs: result storage, task runner, the GPU concurrency limit
of each worker machine."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger
from prefect.filesystems import RemoteFileSystem
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from refany3d.config import BuildSettings, SettingsError
from refany3d.flows.gpu_turns import GpuTurns
from refany3d.storage.fs import S3_PROTOCOLS, s3_options
from refany3d.storage.store import join


def refuse_relative(**paths: str) -> None:
    """In a deployment's run, a relative path is an error (`SettingsError`, one line): a process
    worker runs the flow in a temporary directory and deletes it, output included. `paths` maps a
    parameter's name to its value; empty values and URLs pass."""
    from prefect.runtime import deployment

    if deployment.id is None:
        return
    for name, url in paths.items():
        if url and "://" not in url and not os.path.isabs(url):
            raise SettingsError(
                f"{name}: {url!r} is relative; a deployment run needs an absolute path or URL "
                "(the worker's working directory is temporary)"
            )


def set_switch_interval(settings: BuildSettings) -> None:
    """This process's GIL switch interval: `runtime.switch_interval_ms`. Every torch op releases the
    GIL and takes it back; while another thread runs Python, taking it back waits up to the
    interval, so a stage thread that launches many small kernels (FlashVDM's attention, one grid
    cell at a time) waits that long per op while the GPU idles (`bench/GPU_BUILD_RUN.md`)."""
    sys.setswitchinterval(settings.runtime.switch_interval_ms / 1000)


def result_storage(settings: BuildSettings) -> Path | str:
    """Where task results live: beside the output (`OUT/.prefect-results`), so any worker that
    reaches the output reaches the cache, and deleting the output forgets it. A remote URL is
    saved as a `remote-file-system` block (Prefect wants remote result storage server-side)."""
    url = join(settings.storage.out, ".prefect-results")
    if "://" not in url or url.startswith("file://"):
        return Path(os.path.abspath(url.removeprefix("file://")))
    name = "refany3d-results-" + hashlib.sha256(url.encode()).hexdigest()[:12]
    RemoteFileSystem(basepath=url, settings=_remote_settings(url)).save(name, overwrite=True)
    return f"remote-file-system/{name}"


def _remote_settings(url: str) -> dict:
    """fsspec options of the result store: for s3, the endpoint and region of `s3_options` and no
    listing cache (other workers write records). Credentials stay out: the block is stored on the
    server, and each worker's botocore reads its own from the AWS environment variables."""
    if not url.startswith(S3_PROTOCOLS):
        return {}
    options = {k: v for k, v in s3_options().items() if k in ("client_kwargs",)}
    return {**options, "use_listings_cache": False}


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


def gpu_limit_name(host: str | None = None) -> str:
    """The Prefect global concurrency limit of the GPUs of machine `host` (default: this one)."""
    return f"gpu-{host or socket.gethostname()}"


def ensure_gpu_limit(name: str, slots: int) -> int:
    """Create the limit `name` with `slots` slots unless it exists; its size (an existing limit
    keeps its own: a build never resizes the slots another build, or an operator, set). One API
    read per GPU task (a task is a whole batch; its turns read nothing)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # another task of this machine was first
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        return client.read_global_concurrency_limit_by_name(name).limit


def gpu_turns(settings: BuildSettings) -> Callable[[], contextlib.AbstractContextManager]:
    """Turns on one slot of this machine's GPU limit (`gpu-<host name>`, created with
    `runtime.gpu_slots` slots when missing), taken where the task runs: workers on two machines
    each run their own slots, and concurrent builds share a machine's slots without resizing them.
    A GPU task takes a turn per forward pass; the process keeps a slot it took while its stage
    threads take turns (`gpu_turns.py`), so a turn costs no server call."""
    name = gpu_limit_name()
    size = ensure_gpu_limit(name, settings.runtime.gpu_slots)
    if size != settings.runtime.gpu_slots:
        get_run_logger().info(
            "%s has %d slot(s), not runtime.gpu_slots=%d: it was created earlier, and builds leave it "
            "as it is (resize it with `prefect global-concurrency-limit update %s --limit N`)",
            name, size, settings.runtime.gpu_slots, name,
        )  # fmt: skip
    turns = _process_turns(name)
    return lambda: turns.turn(size)


LEASE_S = 60.0  # of a GPU slot a lane holds; Prefect renews it while the process lives
_TURNS: dict[str, GpuTurns] = {}  # this process's turns, per machine limit
_TURNS_LOCK = threading.Lock()


def _process_turns(name: str) -> GpuTurns:
    from prefect.concurrency.sync import concurrency

    with _TURNS_LOCK:
        if name not in _TURNS:
            # A short lease (Prefect renews it while held): a worker killed holding the slot frees
            # it within a minute, not the default five. A renewal that fails leaves the lane
            # holding on (a GPU-sharing hint gone stale), instead of cancelling the lane's thread.
            _TURNS[name] = GpuTurns(
                lambda: concurrency(
                    name, occupy=1, strict=True, lease_duration=LEASE_S, raise_on_lease_renewal_failure=False
                )
            )
        return _TURNS[name]


def give_back_gpu_slots() -> None:
    """Give the slots this process holds and no turn uses back to the server (a flow's end)."""
    with _TURNS_LOCK:
        turns = list(_TURNS.values())
    for each in turns:
        each.give_back_idle()
