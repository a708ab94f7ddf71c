"""`run_training`: the training loop over the trainer functions, with progress, logs and previews."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from refany3d.config import SettingsError, TrainSettings
from refany3d.storage.fs import url_to_fs
from refany3d.storage.store import join, write_atomic
from refany3d.train import data as data_mod
from refany3d.train.checkpoint import refuse_used_out
from refany3d.train.encode import encode_sample, flow_batch
from refany3d.train.preview import preview_png
from refany3d.train.tracking import MetricsLog, end_tracking, log_preview, log_step, start_tracking
from refany3d.train.trainer import (
    SKIP_REASONS,
    Trainer,
    build_trainer,
    describe_run,
    load_checkpoint,
    make_loader,
    read_metrics,
    run_model_settings,
    save_checkpoint,
    train_step,
    warm_start,
    write_json,
)

logger = logging.getLogger("refany3d.train")


@dataclass
class TrainResult:
    out: str
    steps: int  # last step reached
    resumed_from: int | None  # step of the checkpoint the run started from
    metrics: list[dict[str, float]]  # one row per step (all steps of the run's history)
    checkpoints: list[str] = field(default_factory=list)  # written by this run
    previews: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    warm_start: str | None = None  # adapter directory a fresh run started from


def configure_logging() -> None:
    """Training logs on stderr: INFO on the main rank, warnings only on the others."""
    import os

    rank = int(os.environ.get("RANK", "0"))
    train_logger = logging.getLogger("refany3d")
    if not any(getattr(h, "refany3d_train", False) for h in train_logger.handlers):
        handler = logging.StreamHandler()
        handler.refany3d_train = True
        handler.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(message)s"))
        train_logger.addHandler(handler)
    train_logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def preview_batch(tr: Trainer) -> tuple[Any, torch.Tensor] | None:
    """(FlowBatch without dropout, reference view 0 images) of the first readable samples."""
    want, encodings, refs, items = tr.settings.checkpoint.sample_count, [], [], []
    reader = data_mod._GroupReader()
    for ref in (r for g in tr.groups for r in g):
        try:
            raw = data_mod.decode_row(reader.row(ref), tr.settings.data, tr.settings.model.num_views)
        except Exception:  # noqa: BLE001 - skipped rows are counted by the stream itself
            continue
        items.append(data_mod.Item(0, raw.sample_id, "", False, False))
        encodings.append(encode_sample(tr.components, raw))
        refs.append(raw.views_rgb[0] if len(raw.views_rgb) else raw.image)
        if len(items) == want:
            break
    if not items:
        return None
    batch = flow_batch(encodings, items, tr.drops, tr.settings, tr.accelerator.device, tr.dtype)
    return batch, torch.stack(refs)


def write_preview(tr: Trainer, batch) -> str:
    model = tr.accelerator.unwrap_model(tr.model)
    model.eval()
    png = preview_png(
        tr.components,
        batch[0],
        batch[1],
        tr.settings.checkpoint.sample_steps,
        tr.settings.checkpoint.guidance,
        seed=tr.settings.optim.seed,
    )
    fs, root = url_to_fs(tr.out)
    name = f"samples/step-{tr.step:08d}.png"
    write_atomic(fs, join(root, name), png)
    log_preview(tr.accelerator, tr.settings, png, tr.step)
    return join(tr.out, name)


def _due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


def run_training(
    settings: TrainSettings,
    resume: bool = False,
    on_step: Callable[[dict[str, float]], None] | None = None,
    explicit: frozenset[str] = frozenset(),
) -> TrainResult:
    """Train to `settings.optim.steps` (resuming from the newest checkpoint in `checkpoint.dir`
    when `resume`); the main process writes metrics.jsonl, checkpoints, previews and summary.json.
    Without `resume`, `checkpoint.dir` must be empty (SettingsError otherwise): a run never takes
    over, prunes or overwrites another run's outputs. A resumed run takes its model flags from its
    checkpoint's config.json; one in `explicit` (set by the user) that conflicts is a SettingsError."""
    if not resume:
        refuse_used_out(settings.checkpoint.dir)
    else:
        settings = run_model_settings(settings, explicit)
    tr = build_trainer(settings)
    info = load_checkpoint(tr) if resume else None
    warm = warm_start(tr) if info is None and settings.checkpoint.init_adapters else None
    if warm:
        logger.info("warm start from the adapters in %s", warm)
    main = tr.accelerator.is_main_process
    metrics = read_metrics(tr.out, tr.step) if info else []
    result = TrainResult(tr.out, tr.step, info.step if info else None, metrics, warm_start=warm)
    log = MetricsLog(tr.out)
    if main and info:  # the killed run may have logged steps past its checkpoint: cut them, once
        log.restart(metrics)
    if info:
        logger.info("resumed from step %d (%s), data position %d", info.step, info.url, info.position)
    start_tracking(tr.accelerator, settings, info.step if info else None)
    try:
        _loop(tr, result, log, on_step)
    finally:
        end_tracking(tr.accelerator, settings)
    result.steps = tr.step
    result.summary = _summary(tr, result)
    if main:
        log.flush()
        write_json(tr.out, "summary.json", result.summary)
    return result


def _loop(
    tr: Trainer, result: TrainResult, log: MetricsLog, on_step: Callable[[dict[str, float]], None] | None
) -> None:
    """Steps to `optim.steps`: metrics (metrics.jsonl, the tracker), logs, checkpoints, previews."""
    settings, main = tr.settings, tr.accelerator.is_main_process
    logger.info(
        "base model: %s; %d samples, %d process(es)",
        tr.components.label,
        sum(map(len, tr.groups)),
        tr.accelerator.num_processes,
    )
    cfg, last = settings.checkpoint, settings.optim.steps
    previews = preview_batch(tr) if main else None
    stream = iter(make_loader(tr))
    bar = tqdm(total=last, initial=tr.step, disable=not main, desc=settings.name, unit="step")
    tick, tick_step = time.perf_counter(), tr.step
    per_step = tr.samples_per_micro_step * settings.optim.gradient_accumulation
    empty, epoch_steps = 0, -(-sum(map(len, tr.groups)) // per_step)  # steps of one pass over the data
    while tr.step < last:
        started = time.perf_counter()
        row = train_step(tr, [next(stream) for _ in range(settings.optim.gradient_accumulation)])
        if row is None:  # every sample skipped: no step; a whole pass of them is nothing to train on
            empty += 1
            if empty > epoch_steps:
                raise SettingsError(
                    f"data.shards: no readable sample in a whole pass over {settings.data.shards!r} "
                    f"({_skips(tr)}); nothing to train on"
                )
            continue
        empty = 0
        seconds = time.perf_counter() - started
        row = {**row, "step_s": seconds, "samples_per_s": per_step / max(seconds, 1e-9)}
        result.metrics.append(row)
        if main:
            log.add(row)
        log_step(tr.accelerator, settings, row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if on_step:
            on_step(row)
        if tr.step % cfg.log_every == 0 or tr.step == last:
            now = time.perf_counter()
            samples = (tr.step - tick_step) * tr.samples_per_micro_step * settings.optim.gradient_accumulation
            logger.info(
                "step %d loss %.5f lr %.3g grad %.3g %.2f samples/s",
                tr.step, row["loss"], row["lr"], row["grad_norm"], samples / max(now - tick, 1e-9),
            )  # fmt: skip
            tick, tick_step = now, tr.step
            if main:
                log.flush()
        if _due(tr.step, cfg.every, last):
            if main:  # metrics first: a listed checkpoint always has its history on disk
                log.flush()
            saved = save_checkpoint(tr, row)
            if main:
                result.checkpoints.append(saved.url)
        if main and previews is not None and _due(tr.step, cfg.sample_every, last):
            result.previews.append(write_preview(tr, previews))
    bar.close()


def _skips(tr: Trainer) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(tr.counts.items()) if k.startswith("skipped_")) or "none"


def _summary(tr: Trainer, result: TrainResult) -> dict[str, Any]:
    """Run facts + counts summed over ranks (skips per reason, encodes, cache hits)."""
    names = [f"skipped_{r}" for r in SKIP_REASONS] + ["encoded", "cache_hits"]
    local = torch.tensor([tr.counts[n] for n in names], dtype=torch.float64, device=tr.accelerator.device)
    total = tr.accelerator.reduce(local, reduction="sum").tolist()
    losses = [r["loss"] for r in result.metrics]
    return {
        **describe_run(tr),
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "warm_start": result.warm_start,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "counts": {n: int(v) for n, v in zip(names, total)},
        "checkpoints": result.checkpoints,
        "previews": result.previews,
    }
