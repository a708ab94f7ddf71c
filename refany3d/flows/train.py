"""The `train` flow: train RefAny3D on the newest dataset version, resuming from the newest checkpoint.

Thin: resolve the dataset, run the training loop (in the flow's process, or `processes` ranks through
torchrun on a multi-GPU worker), publish the artifacts (loss curve, sample gallery, checkpoint links,
summary table). The loop itself is `refany3d.train.run_training`; nothing here knows the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import yaml
from fsspec.core import url_to_fs
from prefect import flow, get_run_logger, task

from refany3d.config import TrainSettings, override, to_dict
from refany3d.storage.store import join
from refany3d.train.data import shard_files


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


@flow(name="train", log_prints=True)
def train(
    dataset: str = "out/dataset",
    out: str = "out/train",
    base_weights: str = "",
    steps: int = 0,
    resume: bool = True,
    settings: TrainSettings | None = None,
) -> dict[str, Any]:
    """Train on the newest version of `dataset` into `out` (resuming from its newest checkpoint when
    `resume`); `base_weights` = FLUX.1-dev snapshot directory (empty: the tiny random model);
    `steps` = 0 keeps `settings.optim.steps`."""
    from refany3d.flows.train_artifacts import publish_training

    logger = get_run_logger()
    cfg = train_settings(dataset, out, base_weights, steps, settings)
    logger.info("training %s on %s into %s", cfg.name, cfg.data.shards, cfg.checkpoint.dir)
    result = fit(cfg, resume)
    publish_training(result)
    s = result["summary"]
    logger.info(
        "finished at step %d (resumed from %s), loss %s -> %s",
        s["steps"],
        s["resumed_from"],
        s["first_loss"],
        s["last_loss"],
    )
    return {"summary": s, "out": cfg.checkpoint.dir}
