"""The `train` flow: scheduled retraining, one run per dataset version, promoted when it does not regress.

As TFX does it: resolve the newest dataset version (`storage/versions.py`); skip when that version
was already trained and decided; otherwise train a new run (warm-started from the last promoted
adapters), evaluate it and the promoted run on the same held-out samples (`evaluate/heldout.py`) and
promote it (`OUT/promoted.json` + a Prefect artifact) only when no metric regresses. Training runs
in the flow's process, or `processes` ranks through torchrun on a multi-GPU worker. The loop itself
is `refany3d.train.run_training`; nothing here knows the model.

    OUT/runs/<version>/     one training run (checkpoints/, metrics.jsonl, summary.json, decision.json)
    OUT/promoted.json       the promoted run: its checkpoint, dataset version, metrics, the previous one
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.states import Failed, State

from refany3d.config import EvaluateSettings, SettingsError, TrainSettings, override, to_dict
from refany3d.flows.runtime import refuse_relative
from refany3d.storage.fs import url_to_fs
from refany3d.storage.store import join
from refany3d.storage.versions import read_version
from refany3d.train.checkpoint import POINTER, list_checkpoints, read_pointer, write_pointer
from refany3d.train.data import shard_files
from refany3d.train.trainer import resolve_device, write_json

RUNS = "runs"  # out/runs/<dataset version>/: one training run per version
DECISION = "decision.json"  # written last in a run directory: the version is done


def newest_dataset(url: str) -> str:
    """`url` itself when it holds shards, else its newest dataset version: the sub-directory whose
    build finished last (`stats.json`, written at the end of a build, has the latest mtime)."""
    if shard_files(url):
        return url
    fs, root = url_to_fs(url)
    protocol = url.split("://")[0] + "://" if "://" in url else ""
    builds = [p for p in fs.glob(join(root, "*", "stats.json"))]
    if not builds:
        raise FileNotFoundError(f"dataset: no shards and no dataset versions under {url!r}")
    newest = max(builds, key=lambda p: (fs.modified(p).timestamp(), p))
    return protocol + newest.rsplit("/", 1)[0]


def train_settings(
    dataset: str, out: str, base_weights: str, steps: int, settings: TrainSettings | None
) -> TrainSettings:
    """The run's settings: `settings` (or defaults) with the flow parameters applied on top."""
    dotted: dict[str, Any] = {"data.shards": newest_dataset(dataset), "checkpoint.dir": out}
    if base_weights:
        dotted["model.pretrained"] = base_weights
    if steps:
        dotted["optim.steps"] = steps
    return override(settings or TrainSettings(), **dotted)


def _launch(settings: TrainSettings, resume: bool) -> dict[str, Any]:
    """Run `refany3d train` on `settings.processes` ranks (torchrun) and read back what it wrote."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(to_dict(settings), fh)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={settings.processes}",
    ]
    cmd += ["-m", "refany3d.cli", "train", "--config", fh.name] + (["--resume"] if resume else [])
    try:
        subprocess.run(
            cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        )
    finally:
        os.unlink(fh.name)
    fs, root = url_to_fs(settings.checkpoint.dir)
    summary = json.loads(fs.cat_file(join(root, "summary.json")))
    metrics = [json.loads(line) for line in fs.cat_file(join(root, "metrics.jsonl")).decode().splitlines()]
    return {"summary": summary, "metrics": metrics}


@task(task_run_name="fit-{settings.name}")
def fit(settings: TrainSettings, resume: bool) -> dict[str, Any]:
    """Train to `settings.optim.steps`; returns the run summary and per-step metrics (small JSON)."""
    if settings.processes > 1:
        result = _launch(settings, resume)
    else:
        from refany3d.train.run import run_training

        run = run_training(settings, resume=resume)
        result = {"summary": run.summary, "metrics": run.metrics}
    return {"name": settings.name, **result}


@task(task_run_name="evaluate-{settings.name}")
def evaluate_candidate(
    settings: TrainSettings, adapters: dict[str, str], evaluation: EvaluateSettings | None
) -> dict[str, Any]:
    """Held-out reports of the candidate (and the promoted run) and the promotion decision."""
    from refany3d.evaluate.heldout import decide, evaluate_adapters

    reports = evaluate_adapters(settings, adapters, evaluation)
    return {"reports": reports, **decide(reports, settings.retrain.tolerance)}


def _read_json(url: str) -> dict[str, Any] | None:
    fs, path = url_to_fs(url)
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def run_name() -> str:
    """The flow run's name, as the build flow's is its dataset name: the run name (`settings.name`)."""
    from prefect.runtime import flow_run

    settings = flow_run.parameters.get("settings")
    if isinstance(settings, dict):  # parameters as the API holds them
        settings = TrainSettings(name=settings.get("name") or TrainSettings().name)
    return (settings or TrainSettings()).name


@flow(name="train", flow_run_name=run_name, log_prints=True)
def train(
    dataset: str = "out/dataset",
    out: str = "out/train",
    base_weights: str = "",
    steps: int = 0,
    resume: bool = True,
    settings: TrainSettings | None = None,
    evaluation: EvaluateSettings | None = None,
) -> dict[str, Any] | State:
    """Scheduled retraining: once per dataset version of `dataset` (its newest finished build),
    train into `out/runs/<version>` (from the promoted adapters with `retrain.warm_start`), evaluate
    on held-out samples against the promoted run and promote (`out/promoted.json`) unless a metric
    regresses. A version already decided completes at once ("dataset unchanged"). `resume`
    continues an interrupted run of the version; `steps` = 0 keeps `settings.optim.steps`;
    `base_weights` = FLUX.1-dev snapshot directory (empty: the tiny random model)."""
    from refany3d.flows import train_artifacts as arts

    logger = get_run_logger()
    try:  # a relative path in a deployment run names the worker's temporary directory
        refuse_relative(dataset=dataset, out=out, base_weights=base_weights)
    except SettingsError as err:
        logger.error("%s", err)
        return Failed(message=str(err))
    version = read_version(newest_dataset(dataset))
    run_dir = join(out, RUNS, version.version)
    name = (settings or TrainSettings()).name
    decided = _read_json(join(run_dir, DECISION))
    if decided is not None:
        message = arts.publish_unchanged(name, version.version, run_dir, decided)
        logger.info(message)
        return {"status": "unchanged", "version": version.version, "out": run_dir}
    promoted = read_pointer(out)
    cfg = train_settings(version.root, run_dir, base_weights, steps, settings)
    try:  # cuda asked on a machine without it: fail here, in one line, not train on the CPU
        cfg = resolve_device(cfg)
    except SettingsError as err:
        logger.error("%s", err)
        return Failed(message=str(err))
    if cfg.data.holdout_fraction <= 0:  # before any work: every version is evaluated on held-out samples
        raise SettingsError("data.holdout_fraction: 0 holds no samples out to evaluate on; set e.g. 0.05")
    if cfg.retrain.warm_start and promoted:
        cfg = override(cfg, **{"checkpoint.init_adapters": promoted["checkpoint"]})
    logger.info(
        "training %s on dataset %s (%s) into %s, %s",
        cfg.name, version.version, version.root, run_dir,
        f"warm start from {promoted['checkpoint']}" if cfg.checkpoint.init_adapters else "fresh adapters",
    )  # fmt: skip
    result = fit(cfg, resume)
    arts.publish_training(result)
    checkpoint = list_checkpoints(run_dir)[-1]
    where = checkpoint.url if "://" in checkpoint.url else os.path.abspath(checkpoint.url)  # any cwd
    adapters = {"candidate": where, **({"promoted": promoted["checkpoint"]} if promoted else {})}
    decision = evaluate_candidate(cfg, adapters, evaluation)
    record = {
        "version": version.version, "dataset": version.root, "run": run_dir, "checkpoint": where,
        "step": checkpoint.step, "base": checkpoint.manifest.get("base"), "promote": decision["promote"],
        "reason": decision["reason"], "metrics": decision["candidate"], "comparison": decision["comparison"],
        "previous": promoted, "warm_start": cfg.checkpoint.init_adapters or None,
    }  # fmt: skip
    if decision["promote"]:
        write_pointer(out, record)
    write_json(run_dir, DECISION, record)
    logger.info(arts.publish_decision(name, record, join(out, POINTER)))
    return {
        "status": "promoted" if decision["promote"] else "refused",
        "version": version.version,
        "out": run_dir,
    }
