"""Deployments of the refany3d flows: `build-dataset` and `train` on the `cpu` and `gpu` work pools,
`build-dataset-partitioned` on `control` (process type), or served in-process for one-machine
setups.

Entry points are module paths (`refany3d.flows.build_dataset.build_dataset`), so a worker on any
machine with the package installed (a virtualenv, the docker images) can run them; no code upload.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

from prefect.flows import Flow
from prefect.types.entrypoint import EntrypointType

from refany3d import __version__
from refany3d.config import BuildSettings, SettingsError, override, to_dict

POOLS = ("cpu", "gpu")
# The parent of a partitioned build only waits for its children; on its own pool it never takes a
# slot of the cpu/gpu workers that run them (docs/operating.md, "Many workers").
CONTROL_POOL = "control"
PARTITIONS = 4  # default partitions of the build-dataset-partitioned deployment
HEARTBEAT_S = 30  # flow-run heartbeats (Prefect's minimum), for the zombie automation
ZOMBIE_AFTER_S = 90  # a running flow run with no heartbeat for this long is marked Crashed
ZOMBIE_AUTOMATION = "refany3d-crash-zombie-flow-runs"
NO_CRON = "none"  # --cron none / --build-cron none: remove the schedules
HOLDOUT_FRACTION = 0.05  # of the samples, held out of scheduled retraining to evaluate each version
# Environment of flow-run processes: stage loggers reach the UI, headless GL for the renderer.
# Heartbeats let the zombie automation mark the run of a dead worker Crashed.
JOB_ENV = {
    "PREFECT_LOGGING_EXTRA_LOGGERS": "refany3d",
    "PYOPENGL_PLATFORM": "egl",
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
}


@dataclass(frozen=True)
class Registered:
    """One line of the `refany3d deploy` report."""

    name: str  # <flow>/<deployment>
    pool: str
    status: str  # "registered" or why not


def api_url() -> str | None:
    """The Prefect API this process talks to (PREFECT_API_URL or the active profile), if any."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def absolute(url: str) -> str:
    """`url` as any worker reads it: a URL as it is, a path made absolute against this process's
    working directory (a process worker runs each flow run in a temporary directory it deletes)."""
    return url if not url or "://" in url else os.path.abspath(os.path.expanduser(url))


def _absolute_paths(settings: BuildSettings) -> BuildSettings:
    paths = {k: getattr(settings.storage, k) for k in ("out", "artifacts")}
    paths["data_files"] = settings.source.data_files
    return override(
        settings,
        **{("source." if k == "data_files" else "storage.") + k: absolute(v) for k, v in paths.items()},
    )


# The `gpu` profile: what the build deployment on the gpu pool runs with, where the deployed settings
# leave a setting at its default. Each value is a measurement on one H200 (bench/results/, 2026-12):
GPU_PROFILE: dict[str, Any] = {
    "runtime.device": "cuda",
    "runtime.dtype": "float16",  # every GPU bench ran the networks in fp16
    "detector.batch_size": 8,  # perception.md: 87.5 ms an image at batch 8 (detect + segment + depth)
    "segmenter.batch_size": 8,
    "depth.batch_size": 8,
    "mesher.compile": True,  # mesh_gpu_h200_sdpa.json: standard 6.62 s an asset compiled, 11.4 eager
    "mesher.batch_size": 4,  # standard compiled: 6.62 s at DiT batch 4, 6.73 at 1
    # gpu_build_h200.json (the whole DAG, 16-core H200 worker): 12 processes of 1 thread each for
    # the mesh post-processing and 16 task threads made 2,930 samples/h on the fast path; 4
    # batches in flight and 1 GPU slot are the defaults those runs kept
    "mesher.post_processes": 12,
    "runtime.workers": 16,
    "runtime.batches_in_flight": 4,
    "runtime.gpu_slots": 1,
}


def gpu_profile(settings: BuildSettings) -> BuildSettings:
    """`settings` with `GPU_PROFILE` wherever they hold the default value (what a user set stays)."""
    defaults = BuildSettings()
    override(defaults, **GPU_PROFILE)  # a key that is no setting, or a bad value: a SettingsError
    chosen = {k: v for k, v in GPU_PROFILE.items() if _get(settings, k) == _get(defaults, k)}
    return override(settings, **chosen)


def _get(settings: BuildSettings, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(settings, section), name)


def build_parameters(pool: str, base: BuildSettings | None = None) -> dict[str, Any]:
    """Default parameters of the build deployment on `pool` (the gpu pool: the `gpu` profile), its
    paths resolved to absolute ones now, at deploy time."""
    settings = _absolute_paths(base or BuildSettings())
    if pool == "gpu":
        settings = gpu_profile(settings)
    return {"settings": to_dict(settings)}


def train_parameters(pool: str, base: BuildSettings | None = None, train: Any = None) -> dict[str, Any]:
    """Default parameters of the train deployment: the build's output as the dataset (its newest
    version is resolved at run time), `HOLDOUT_FRACTION` of the samples held out for the promotion
    evaluation, an interrupted run resumed, bf16 on CUDA on `gpu`, fp32 on the CPU on `cpu`."""
    from refany3d.config import TrainSettings

    settings = train or override(TrainSettings(), **{"data.holdout_fraction": HOLDOUT_FRACTION})
    if pool == "gpu":
        settings = override(settings, **{"runtime.device": "cuda", "runtime.dtype": "bfloat16"})
    else:  # a cpu worker has no CUDA to honour (train/gpu's cuda would fail there in one line)
        settings = override(settings, **{"runtime.device": "cpu", "runtime.dtype": "float32"})
    out = absolute(settings.checkpoint.dir)
    settings = override(settings, **{"checkpoint.dir": out})
    dataset = absolute((base or BuildSettings()).storage.out)
    return {"dataset": dataset, "out": out, "resume": True, "settings": to_dict(settings)}


def train_flow() -> Flow | None:
    """The training flow, when this version has one (`refany3d.flows.train.train`)."""
    try:
        module = importlib.import_module("refany3d.flows.train")
    except ModuleNotFoundError as err:
        if err.name == "refany3d.flows.train":
            return None
        raise
    return getattr(module, "train", None)


def ensure_pools(pools: tuple[str, ...] = POOLS) -> None:
    """Create the process work pools that do not exist yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        for pool in pools:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            except ObjectAlreadyExists:
                pass


def ensure_zombie_automation(after_s: int = ZOMBIE_AFTER_S) -> None:
    """The automation that marks a flow run Crashed when its heartbeats stop for `after_s` seconds
    (its worker's machine died), as Prefect's docs do for self-hosted servers: the parent of a
    partitioned build then starts that partition again. Replaced when `after_s` changed."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        found = Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:
        found = None
    if found is not None and found.trigger.within == timedelta(seconds=after_s):
        return
    if found is not None:
        found.delete()
    finals = ("Completed", "Failed", "Cancelled", "Crashed")
    Automation(
        name=ZOMBIE_AUTOMATION,
        description=f"refany3d: a flow run with no heartbeat for {after_s} s is marked Crashed",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in finals)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=after_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED, message=f"no heartbeat for {after_s} s: its worker is gone"
            )
        ],
    ).create()


def _deployment(flow: Flow, name: str, pool: str | None, parameters: dict[str, Any], cron: str | None):
    return flow.to_deployment(
        name=name,
        work_pool_name=pool,
        parameters=parameters,
        cron=cron if cron and cron != NO_CRON else None,
        job_variables={"env": JOB_ENV} if pool else None,
        entrypoint_type=EntrypointType.MODULE_PATH,
        version=__version__,
        tags=["refany3d", pool or "served"],
    )


def check_cron(*crons: str | None) -> None:
    """A cron that is not one (nor `none`) fails here, in one line, before anything is registered."""
    from prefect.client.schemas.schedules import CronSchedule

    for cron in crons:
        if cron and cron != NO_CRON:
            try:
                CronSchedule(cron=cron)
            except ValueError:
                raise SettingsError(f"--cron/--build-cron: {cron!r} is not a cron expression") from None


def _describe(schedules: list) -> str:
    crons = [getattr(s.schedule, "cron", None) or str(s.schedule) for s in schedules]
    return ", ".join(f"cron {c!r}" + ("" if s.active else " (paused)") for c, s in zip(crons, schedules))


def _apply(deployment, pool: str, cron: str | None) -> str:
    """Register `deployment`; its schedules: kept as they are when `cron` is None, replaced by `cron`,
    removed with `none`. Returns what is scheduled now, for the report."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_deployment_by_name(f"{deployment.flow_name}/{deployment.name}")
            before = client.read_deployment_schedules(found.id)
        except ObjectNotFound:
            before = []
    deployment_id = deployment.apply(work_pool_name=pool)
    if cron is None:
        wanted = [(s.schedule, s.active) for s in before]
    else:
        wanted = [] if cron == NO_CRON else [(CronSchedule(cron=cron), True)]
    with get_client(sync_client=True) as client:
        now = client.read_deployment_schedules(deployment_id)
        if [(s.schedule, s.active) for s in now] != wanted:  # replace only what differs
            for schedule in now:
                client.delete_deployment_schedule(deployment_id, schedule.id)
            if wanted:
                client.create_deployment_schedules(deployment_id, wanted)
        now = client.read_deployment_schedules(deployment_id)
    return _describe(now) or "no schedule"


def deploy(
    pools: tuple[str, ...] = POOLS,
    base: BuildSettings | None = None,
    build_cron: str | None = None,
    train_cron: str | None = None,
    train_base: Any = None,
    zombie_after_s: int = ZOMBIE_AFTER_S,
) -> list[Registered]:
    """Register `build-dataset/<pool>` and `train/<pool>` with the API server. A cron of None keeps
    a deployment's existing schedules, `none` removes them; `train_cron` goes to train/gpu when
    `pools` has gpu, else to train/cpu."""
    from refany3d.flows.build_dataset import build_dataset
    from refany3d.flows.partitioned import build_dataset_partitioned

    check_cron(build_cron, train_cron)
    ensure_pools((*pools, CONTROL_POOL))
    ensure_zombie_automation(zombie_after_s)
    done = []
    for pool in pools:
        params = build_parameters(pool, base)
        scheduled = _apply(_deployment(build_dataset, pool, pool, params, build_cron), pool, build_cron)
        where = params["settings"]["storage"]["out"]
        done.append(Registered(f"build-dataset/{pool}", pool, f"registered, out {where}; {scheduled}"))
    params = {**build_parameters("cpu", base), "partitions": PARTITIONS}
    parent = _deployment(build_dataset_partitioned, CONTROL_POOL, CONTROL_POOL, params, None)
    scheduled = _apply(parent, CONTROL_POOL, None)
    done.append(
        Registered(
            "build-dataset-partitioned/control",
            CONTROL_POOL,
            f"registered, {PARTITIONS} partitions on build-dataset/cpu (gpu for runtime.device=cuda); {scheduled}",
        )
    )
    train = train_flow()
    # One retraining schedule: two train deployments on one cron would train each version twice
    # into the same `out`. It goes to train/gpu when deployed, else train/cpu.
    cron_pool = "gpu" if "gpu" in pools else "cpu"
    for pool in pools:
        if train is None:
            done.append(Registered(f"train/{pool}", pool, "not available: this version has no training flow"))
            continue
        params = train_parameters(pool, base, train_base)
        cron = train_cron if pool == cron_pool else None
        scheduled = _apply(_deployment(train, pool, pool, params, cron), pool, cron)
        where = f"dataset {params['dataset']}, out {params['out']}, device {params['settings']['runtime']['device']}"
        done.append(Registered(f"train/{pool}", pool, f"registered, {where}; {scheduled}"))
    return done


def serve(
    base: BuildSettings | None = None, build_cron: str | None = None, train_cron: str | None = None
) -> None:
    """Serve the deployments from this process (no work pool, no worker); blocks until stopped."""
    from prefect import serve as prefect_serve

    from refany3d.flows.build_dataset import build_dataset

    deployments = [_deployment(build_dataset, "local", None, build_parameters("cpu", base), build_cron)]
    train = train_flow()
    if train is not None:
        deployments.append(_deployment(train, "local", None, train_parameters("cpu", base), train_cron))
    prefect_serve(*deployments)
