"""Held-out evaluation of trained adapters, and the promotion rule of scheduled retraining.

The held-out samples are the rows `data.holdout_fraction` keeps out of training (a hash of the
sample id, so the split is the same in every dataset version). Each is generated from its own
reference views and caption with the adapters under test (`RefAny3DPipeline.generate`, the same
seed for every candidate) and scored with `refany3d evaluate`'s metrics against the row's mesh:
the weight-free geometric ones always, CLIP / DINO where their weights exist.

A candidate is compared with the promoted run on the same held-out samples (both evaluated now,
as TFX's Evaluator does with its baseline); it is promoted only when no metric regresses by more
than `retrain.tolerance`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from refany3d.config import EvaluateSettings, SampleSettings, TrainSettings, override
from refany3d.evaluate.run import (
    METRICS,
    GeneratedSample,
    build_report,
    dataset_rows,
    evaluate_sample,
    scorers,
)
from refany3d.models.flux.components import FluxComponents, load_components
from refany3d.render.mesh import load_mesh
from refany3d.sampling.assets import ConditionViews
from refany3d.train import data as data_mod


def heldout_rows(settings: TrainSettings, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` held-out rows (sorted by sample id) with their mesh, of `data.shards`."""
    files = data_mod.shard_files(settings.data.shards)
    groups = data_mod.build_index(files, settings.data.holdout_fraction, evaluation=True)
    refs = sorted((r for g in groups for r in g), key=lambda r: r.sample_id)[:limit]
    meshes = dataset_rows(settings.data.shards, {r.sample_id for r in refs})
    reader, rows = data_mod._GroupReader(), []
    for ref in refs:
        mesh = meshes.get(ref.sample_id, {}).get("mesh_glb")
        if mesh:
            rows.append({**reader.row(ref), "mesh_glb": mesh})
    return rows


def _uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def heldout_pipeline(settings: TrainSettings, components: FluxComponents | None = None):
    """The sampling pipeline (`RefAny3DPipeline`) a run's held-out samples are generated with: its
    base model, model flags and runtime; targets at `data.resolution`, `checkpoint.sample_steps`
    steps at `checkpoint.guidance`."""
    from refany3d.sampling.pipeline import RefAny3DPipeline

    sample = SampleSettings(model=settings.model, runtime=settings.runtime)
    sample = override(
        sample,
        **{
            "sampler.resolution": settings.data.resolution,
            "sampler.steps": settings.checkpoint.sample_steps,
            "sampler.guidance": settings.checkpoint.guidance,
            "render.resolution": settings.data.condition_resolution,
            "render.views": settings.model.num_views,
        },
    )
    if components is None:
        dtype = getattr(torch, settings.runtime.dtype)
        components = load_components(settings.model, settings.runtime.device, dtype)
    components.transformer.eval()
    return RefAny3DPipeline(components, sample)


def row_views(raw: data_mod.RawSample) -> ConditionViews:
    """A decoded row's own reference views as the pipeline's conditions."""
    rgb = list(_uint8(raw.views_rgb)) if raw.views_rgb.shape[0] else []
    maps = [((v.float().permute(1, 2, 0).numpy() + 1.0) / 2.0).clip(0.0, 1.0) for v in raw.views_point_map]
    return ConditionViews(rgb=rgb, point_maps=maps[: len(rgb)], poses=[])


def generate(pipe, raw: data_mod.RawSample, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image (R, R, 3) uint8, point map (R, R, 3) float in [0, 1]) of one held-out sample from its
    own references and caption, through the sampling pipeline (`heldout_pipeline`)."""
    image, point_map = pipe.generate(
        row_views(raw), raw.caption, generator=torch.Generator().manual_seed(seed)
    )
    return image, np.ones_like(image, dtype=np.float32) if point_map is None else point_map


def evaluate_adapters(
    settings: TrainSettings, adapters: dict[str, str], evaluation: EvaluateSettings | None = None
) -> dict[str, dict]:
    """label -> evaluate report (`evaluate.run.build_report`) of each adapters (a run, checkpoint,
    adapter directory or pointer) on the same held-out samples. ValueError when there are none."""
    evaluation = evaluation or EvaluateSettings()
    rows = heldout_rows(settings, settings.retrain.eval_samples)
    if not rows:
        raise ValueError(
            f"data.holdout_fraction={settings.data.holdout_fraction}: no held-out sample with a mesh "
            f"in {settings.data.shards!r} to evaluate on"
        )
    pipe = heldout_pipeline(settings)
    models, notes = scorers(evaluation)
    views = settings.model.num_views
    samples = [data_mod.decode_row(r, settings.data, views) for r in rows]
    meshes = [load_mesh(r["mesh_glb"], file_type="glb") for r in rows]
    reports = {}
    for label, source in adapters.items():
        drawing = _pipeline_for(pipe, settings, source)
        per_sample = {}
        for raw, mesh in zip(samples, meshes):
            image, point_map = generate(drawing, raw, settings.optim.seed)
            refs = list(_uint8(raw.views_rgb)) if views else []
            sample = GeneratedSample(raw.sample_id, image, point_map, refs, mesh, raw.caption)
            per_sample[raw.sample_id] = evaluate_sample(sample, evaluation, models)
        reports[label] = build_report(per_sample, notes, evaluation)
    return reports


def _pipeline_for(pipe, settings: TrainSettings, source: str):
    """`pipe` with the adapters of `source`; where they were trained with other model flags (a
    promoted run of an earlier version), a pipeline of their own flags on the same base, so each
    is drawn as it was trained. ValueError for another number of views: not the same rows."""
    import dataclasses

    from refany3d.config import SettingsError
    from refany3d.train.checkpoint import read_config, resolve_adapters, settings_from_config

    try:
        return pipe.load_lora_weights(source)
    except SettingsError:
        config = read_config(resolve_adapters(source)[0])
        model, _ = settings_from_config(settings.model, config, frozenset(), str(source))
    if model.num_views != settings.model.num_views:
        raise ValueError(
            f"{source}: trained with {model.num_views} views, the candidate with "
            f"{settings.model.num_views}; their held-out samples are not comparable"
        )
    return heldout_pipeline(dataclasses.replace(settings, model=model)).load_lora_weights(source)


def compare(candidate: dict[str, float], promoted: dict[str, float], tolerance: float) -> list[dict]:
    """One row per metric both means have (not nan): values, direction, whether the candidate
    regressed (worse than the promoted run by more than `tolerance`)."""
    rows = []
    for name, (_, better, _) in METRICS.items():
        a, b = candidate.get(name), promoted.get(name)
        if a is None or b is None or math.isnan(a) or math.isnan(b):  # a mean of no sample is null
            continue
        gain = a - b if better == "higher" else b - a
        rows.append(
            {"metric": name, "candidate": a, "promoted": b, "better": better, "regressed": gain < -tolerance}
        )
    return rows


def decide(reports: dict[str, dict], tolerance: float) -> dict[str, Any]:
    """{"promote": bool, "reason": str, "comparison": rows} of a candidate's reports (and the
    promoted run's, under "promoted", when there is one)."""
    candidate = reports["candidate"]["mean"]
    if "promoted" not in reports:
        return {"promote": True, "reason": "no promoted run yet", "comparison": [], "candidate": candidate}
    rows = compare(candidate, reports["promoted"]["mean"], tolerance)
    worse = [r["metric"] for r in rows if r["regressed"]]
    if not rows:
        reason, promote = "no metric to compare with the promoted run", False
    elif worse:
        reason, promote = f"regressed on {', '.join(worse)} (tolerance {tolerance})", False
    else:
        reason, promote = f"no regression on {', '.join(r['metric'] for r in rows)}", True
    return {"promote": promote, "reason": reason, "comparison": rows, "candidate": candidate}
