"""The RefAny3D trainer as separate functions: build, one step, checkpoint, resume, the loop.

Runs on one device or data-parallel through accelerate (`accelerate launch` / torchrun: NCCL on
GPUs, gloo on CPUs). Every rank reads its own slice of each global micro-batch (data.py), gradients
are averaged by DDP, and only the main process writes checkpoints, metrics and previews.

Exact resume: the sample order, dropout and the flow-matching noise are functions of (seed, global
sample position), and the checkpoint restores adapters, optimizer, LR scheduler, RNG states and the
data position, so step k after a resume has the loss of step k of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from refany3d import __version__
from refany3d.config import OptimSettings, SettingsError, TrainSettings, override, settings_hash, to_dict
from refany3d.models.flux.attention import preferred_sdpa
from refany3d.models.flux.components import FluxComponents, load_components
from refany3d.models.flux.loss import FlowBatch, flow_matching_losses
from refany3d.storage.store import join, write_atomic
from refany3d.storage.versions import version_id
from refany3d.train import checkpoint as ckpt
from refany3d.train import data as data_mod
from refany3d.train.encode import (
    LatentCache,
    cache_key,
    dropout_encodings,
    flow_batch,
    item_encodings,
    preprocessing_key,
)
from refany3d.train.tracking import METRICS, accelerator_kwargs

logger = logging.getLogger("refany3d.train")
SKIP_REASONS = (
    data_mod.ROW_UNREADABLE,
    data_mod.IMAGE_MISSING,
    data_mod.IMAGE_CORRUPT,
    data_mod.VIEWS_MISSING,
)


@dataclass
class Trainer:
    """Everything one rank holds while training (built by `build_trainer`)."""

    settings: TrainSettings
    accelerator: Any
    components: FluxComponents
    model: torch.nn.Module  # the RefAny3D transformer, DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    groups: list  # data index (row groups of RowRefs)
    cache: LatentCache
    preprocessing: str
    drops: dict[str, torch.Tensor]  # encodings of the empty prompt and of black references
    step: int = 0  # optimisation steps done
    position: int = 0  # next global sample position
    counts: Counter = field(default_factory=Counter)  # skipped_<reason>, encoded, cache_hits
    dataset_version: str = ""  # version id of the shard files read (storage/versions.py)
    last_batch: tuple | None = None  # (FlowBatch, noise) of the last non-empty micro-batch

    @property
    def out(self) -> str:
        return self.settings.checkpoint.dir

    @property
    def samples_per_micro_step(self) -> int:
        return self.accelerator.num_processes * self.settings.optim.batch_size

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.settings.runtime.dtype)


def build_optimizer(params: list[torch.nn.Parameter], settings: OptimSettings) -> torch.optim.Optimizer:
    """Prodigy as DESIGN §5 (lr 1, bias correction, safeguard warm-up, weight decay), or AdamW.
    `prodigy` is prodigyopt's update with a fused step (train/prodigy.py), `prodigyopt` the
    library's own step; their state is the same, so a run may switch between them on resume."""
    if settings.optimizer in ("prodigy", "prodigyopt"):
        from prodigyopt import Prodigy

        from refany3d.train.prodigy import FusedProdigy

        return (FusedProdigy if settings.optimizer == "prodigy" else Prodigy)(
            params,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            use_bias_correction=True,
            safeguard_warmup=True,
        )
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int):
    """Linear warm-up over `warmup_steps`, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0
    )


def resolve_device(settings: TrainSettings) -> TrainSettings:
    """`runtime.device` as this machine can honour it: `cuda`/`cuda:N` without CUDA is an error (one
    line, never a silent CPU run); `auto` is `cuda` where there is CUDA, else `cpu`, and says so."""
    device = settings.runtime.device
    if device == "auto":
        chosen = "cuda" if torch.cuda.is_available() else "cpu"
        if chosen == "cpu":
            logger.warning("runtime.device=auto: no CUDA on this machine, training on the CPU")
        return override(settings, **{"runtime.device": chosen})
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(
            f"runtime.device: {device!r}, but this machine has no CUDA; use cpu, or auto to fall back"
        )
    return settings


def build_trainer(settings: TrainSettings, components: FluxComponents | None = None) -> Trainer:
    """Accelerator, components, optimizer, data index and cache of one run (this rank).

    `components` (already on the device) replaces `load_components(settings.model)`, e.g. for a
    benchmark's full-size random-weight model."""
    from accelerate import Accelerator

    settings = resolve_device(settings)
    cpu = settings.runtime.device == "cpu"
    accelerator = Accelerator(cpu=cpu, mixed_precision="no", **accelerator_kwargs(settings))
    dtype = getattr(torch, settings.runtime.dtype)
    files = data_mod.shard_files(settings.data.shards)
    if not files:
        raise FileNotFoundError(f"data.shards: no Parquet shards at {settings.data.shards!r}")
    torch.manual_seed(settings.optim.seed)  # adapter init (gaussian LoRA A), same on every rank
    components = components or load_components(settings.model, accelerator.device, dtype)
    model = components.transformer
    optimizer = build_optimizer(model.trainable_parameters(), settings.optim)
    lr_scheduler = build_lr_scheduler(optimizer, settings.optim.warmup_steps)
    model = accelerator.prepare_model(model)
    preprocessing = preprocessing_key(settings, components)
    return Trainer(
        settings=settings,
        accelerator=accelerator,
        components=components,
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        groups=data_mod.build_index(files, settings.data.holdout_fraction),
        cache=LatentCache(settings.data.cache or join(_dataset_root(settings.data.shards), "cache")),
        preprocessing=preprocessing,
        drops=dropout_encodings(components, settings),
        dataset_version=version_id(files),
    )


def _dataset_root(url: str) -> str:
    """The dataset directory of a shards URL (`ROOT/data/*.parquet`, `ROOT/data/x.parquet` or
    `ROOT/data` -> ROOT)."""
    head = url.rstrip("/")
    if any(c in head.rsplit("/", 1)[-1] for c in "*?[") or head.endswith(".parquet"):
        head = head.rsplit("/", 1)[0]
    return head.rsplit("/", 1)[0] if head.endswith("/data") else head


def make_loader(tr: Trainer) -> torch.utils.data.DataLoader:
    """This rank's micro-batches from the trainer's data position on."""
    per_step = tr.samples_per_micro_step
    if tr.position % per_step:
        logger.warning(
            "data position %d is not a multiple of %d samples; rounding down", tr.position, per_step
        )
    stream = data_mod.TrainStream(
        tr.groups,
        tr.settings.data,
        seed=tr.settings.optim.seed,
        views=tr.settings.model.num_views,
        batch_size=tr.settings.optim.batch_size,
        rank=tr.accelerator.process_index,
        world=tr.accelerator.num_processes,
        start_step=tr.position // per_step,
        cache=tr.cache,
        cache_key=functools.partial(cache_key, preprocessing=tr.preprocessing),
    )
    workers = tr.settings.data.num_workers
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        collate_fn=_identity,
        prefetch_factor=4 if workers else None,
    )


def _identity(x):
    return x


def sample_noise(items: list, batch: FlowBatch, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """t (B,) = sigmoid(N(0, 1)) and eps per target, each drawn from its sample's position."""
    ts, eps_rgb, eps_pm = [], [], []
    shape = batch.target_rgb.shape[1:]
    for item in items:
        g = data_mod.sample_rng(seed, item.position, "noise")
        ts.append(torch.sigmoid(torch.randn(1, generator=g)))
        eps_rgb.append(torch.randn(shape, generator=g))
        eps_pm.append(torch.randn(shape, generator=g))
    device, dtype = batch.target_rgb.device, batch.target_rgb.dtype
    noises = [torch.stack(eps_rgb).to(device, dtype)]
    if batch.target_point_map is not None:
        noises.append(torch.stack(eps_pm).to(device, dtype))
    return torch.cat(ts).to(device), noises


def prepare_micro_batch(tr: Trainer, mb: data_mod.MicroBatch) -> tuple[FlowBatch, tuple, float]:
    """(batch, noise, loss weight) of a micro-batch: encodings from the cache (or encoded and
    stored now), dropout applied; an empty micro-batch reuses the last one with weight 0 (ranks
    must still run a backward together)."""
    if not mb.items:
        return (*(tr.last_batch or _placeholder_batch(tr)), 0.0)
    encodings = []
    for item in mb.items:
        enc, fresh = item_encodings(item, tr.components, tr.cache)
        tr.counts["encoded" if fresh else "cache_hits"] += 1
        encodings.append(enc)
    device = tr.accelerator.device
    batch = flow_batch(encodings, mb.items, tr.drops, tr.settings, device, tr.dtype)
    tr.last_batch = (batch, sample_noise(mb.items, batch, tr.settings.optim.seed))
    return (*tr.last_batch, 1.0)


def _placeholder_batch(tr: Trainer) -> tuple[FlowBatch, tuple]:
    """A batch of the run's shapes (zero targets, dropped text and references) for a weight-0
    backward when no sample has been read yet."""
    side = tr.settings.data.resolution // (2 * tr.components.vae_scale_factor)
    channels = tr.accelerator.unwrap_model(tr.model).flux.config.in_channels
    zeros = torch.zeros(side * side, channels)
    item = data_mod.Item(0, "", "", drop_text=True, drop_references=True)
    batch = flow_batch(
        [{"target_rgb": zeros, "target_point_map": zeros}],
        [item],
        tr.drops,
        tr.settings,
        tr.accelerator.device,
        tr.dtype,
    )
    return batch, sample_noise([item], batch, tr.settings.optim.seed)


def _count_skipped(tr: Trainer, micro_batches: list[data_mod.MicroBatch]) -> None:
    for mb in micro_batches:
        for sample_id, reason, detail in mb.skipped:
            tr.counts[f"skipped_{reason}"] += 1
            logger.info("skipped %s (%s) %s", sample_id, reason, detail)


def train_step(tr: Trainer, micro_batches: list[data_mod.MicroBatch]) -> dict[str, float] | None:
    """One optimisation step over `micro_batches` (gradient accumulation); returns its metrics.
    None when every sample of every rank's micro-batches was skipped: no step is taken and no loss
    logged (none was computed); the data position moves on past them."""
    acc, model = tr.accelerator, tr.model
    _count_skipped(tr, micro_batches)
    tr.position += tr.samples_per_micro_step * len(micro_batches)
    # non-empty micro-batches over all ranks: every rank decides alike whether to step, and the
    # loss is their mean (an empty one still runs a weight-0 backward so that DDP's ranks meet)
    local = torch.tensor([float(sum(1 for mb in micro_batches if mb.items))], device=acc.device)
    filled = float(acc.reduce(local, reduction="sum").item())
    if filled == 0:
        return None
    model.train()
    losses = []  # per micro-batch: [rgb, point map], weighted
    scale = acc.num_processes / filled  # DDP averages gradients over ranks: this makes it the mean
    with preferred_sdpa(tr.settings.model.sdpa_kernel):  # forward and backward alike
        for i, mb in enumerate(micro_batches):
            batch, noise, weight = prepare_micro_batch(tr, mb)
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else acc.no_sync(model):
                parts = [part * weight for part in flow_matching_losses(model, batch, noise=noise)]
                acc.backward(sum(parts) * scale)
            losses.append(torch.stack([p.detach() for p in parts]))
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = acc.clip_grad_norm_(params, tr.settings.optim.grad_clip)
    tr.optimizer.step()
    tr.lr_scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.step += 1
    parts = (acc.reduce(torch.stack(losses).sum(dim=0), reduction="sum") / filled).tolist()
    row = {"step": tr.step, "loss": sum(parts), "loss_rgb": parts[0], "grad_norm": float(grad_norm)}
    if len(parts) > 1:
        row["loss_point_map"] = parts[1]
    return {**row, "lr": _lr(tr.optimizer)}


def _lr(optimizer: torch.optim.Optimizer) -> float:
    """The effective learning rate (Prodigy: d * lr)."""
    group = optimizer.param_groups[0]
    return float(group["lr"] * group.get("d", 1.0))


def save_checkpoint(tr: Trainer, metrics: dict[str, float] | None = None) -> ckpt.CheckpointInfo | None:
    """Write this step's checkpoint on the main process (others wait); returns it there.
    `metrics`: this step's row (its model card and manifest record them)."""
    info = None
    if tr.accelerator.is_main_process:
        facts = {
            "dataset_version": tr.dataset_version,
            "metrics": {k: v for k, v in (metrics or {}).items() if k.startswith("loss")},
            "base": tr.components.label,
            "tiny": tr.components.tiny,
            "encoders": tr.components.identity,
            "settings_hash": settings_hash(tr.settings.model),
            "processes": tr.accelerator.num_processes,
            "refany3d": __version__,
        }
        unwrapped = tr.accelerator.unwrap_model(tr.model)
        base = {
            "name_or_path": tr.settings.model.pretrained,
            "label": tr.components.label,
            "fingerprint": tr.components.identity,
        }
        info = ckpt.save_checkpoint(
            tr.out,
            unwrapped,
            tr.optimizer,
            tr.lr_scheduler,
            tr.step,
            tr.position,
            facts,
            tr.settings.checkpoint.keep,
            config=ckpt.model_config(tr.settings.model, unwrapped, base, ckpt.pipeline_defaults(tr.settings)),
        )
    tr.accelerator.wait_for_everyone()
    return info


def load_checkpoint(tr: Trainer) -> ckpt.CheckpointInfo | None:
    """Resume from the newest checkpoint of `tr.out` (on every rank); None when there is none."""
    found = ckpt.list_checkpoints(tr.out)
    if not found:
        return None
    info = ckpt.newest_intact(found, logger.warning)  # a damaged newest one: one line, then older
    if info is None:
        raise SettingsError(f"--resume: every checkpoint in {tr.out} is damaged (see the lines above)")
    manifest = ckpt.load_checkpoint(
        info, tr.accelerator.unwrap_model(tr.model), tr.optimizer, tr.lr_scheduler
    )
    if manifest.get("settings_hash") != settings_hash(tr.settings.model):
        logger.warning("checkpoint %s was trained with other model settings", info.url)
    tr.step, tr.position = info.step, info.position
    return info


def run_model_settings(settings: TrainSettings, explicit: frozenset[str] = frozenset()) -> TrainSettings:
    """`settings` with the model flags of the run being resumed (its newest intact checkpoint's
    config.json): a resumed run goes on as it was trained. A flag in `explicit` (set by the user)
    that conflicts is a SettingsError naming it; before any model is built or file written."""
    found = ckpt.list_checkpoints(settings.checkpoint.dir)
    info = ckpt.newest_intact(found, lambda line: None) if found else None  # load_checkpoint warns
    if info is None:
        return settings
    where = f"the run in {settings.checkpoint.dir!r} (step {info.step})"
    model, changed = ckpt.settings_from_config(settings.model, ckpt.read_config(info.url), explicit, where)
    if changed:
        logger.warning("resuming with the model settings of %s: %s", where, ", ".join(changed))
    return dataclasses.replace(settings, model=model)


def warm_start(tr: Trainer) -> str:
    """Load `checkpoint.init_adapters` (adapters only: a fresh optimizer, step 0) on every rank;
    returns the adapter directory. SettingsError when they were trained on another base."""
    from refany3d.config import SettingsError
    from refany3d.models.flux.io import load_adapters

    adapters, manifest = ckpt.resolve_adapters(tr.settings.checkpoint.init_adapters)
    where = f"checkpoint.init_adapters {str(adapters)!r}"
    weight_flags = frozenset(f"model.{f}" for f in ckpt.WEIGHT_FLAGS)  # the run's own: never adopted
    fix = "set it to match, or start from other adapters"
    config = ckpt.read_config(adapters)
    ckpt.settings_from_config(tr.settings.model, config, weight_flags, where, ckpt.WEIGHT_FLAGS, fix)
    if manifest.get("base", tr.components.label) != tr.components.label:
        raise SettingsError(
            f"checkpoint.init_adapters: {str(adapters)!r} was trained on {manifest['base']!r}, "
            f"not on this run's base {tr.components.label!r}"
        )
    load_adapters(tr.accelerator.unwrap_model(tr.model), adapters)
    return str(adapters)


def write_json(out: str, name: str, obj: Any) -> str:
    from refany3d.storage.fs import url_to_fs

    fs, root = url_to_fs(out)
    write_atomic(fs, join(root, name), json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
    return join(out, name)


def read_metrics(out: str, up_to: int) -> list[dict[str, float]]:
    """Metrics of earlier steps (<= up_to) of the run in `out` (resumed runs keep their history)."""
    from refany3d.storage.fs import url_to_fs

    fs, root = url_to_fs(out)
    path = join(root, METRICS)
    if not fs.exists(path):
        return []
    rows = [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= up_to]


def describe_run(tr: Trainer) -> dict[str, Any]:
    """Facts every output of the run carries (and the label of a tiny random base model)."""
    return {
        "name": tr.settings.name,
        "base": tr.components.label,
        "tiny": tr.components.tiny,
        "processes": tr.accelerator.num_processes,
        "device": str(tr.accelerator.device),
        "samples": sum(len(g) for g in tr.groups),
        "settings": to_dict(tr.settings),
    }
