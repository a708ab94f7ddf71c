"""Does the training loop learn the task? A small RefAny3D trained from scratch on synthetic shards,
scored with the weight-free geometric metrics at step 0, at the end, and against an ablation
trained the same way without reference point maps (issue #25.4).

The model: a small FLUX-architecture transformer (random init, `--size small`; `--size tiny` for a
CPU check) whose base weights train with the adapters (`model.train_base`: every parameter of the
network gets a gradient), the embedded tiny T5 / CLIP text encoders (frozen) and,
in place of FLUX.1-dev's pretrained VAE, `PatchVAE`: an exact, weight-free 2x2 pixel-unshuffle
"autoencoder" (decode(encode(x)) == x). A random-weight VAE would decode even perfect latents into
noise; the check is whether the transformer learns images and point maps consistent with the asset,
so the autoencoder must be lossless, not learnt.

Three phases, because the GPU machine has neither the build's dependencies (Prefect, Open3D,
pyrender) nor room for full shards, and the geometric metrics need Open3D (bench/LEARNING_RUN.md):

- `slim` (CPU, here): the training columns of a `refany3d build` (truth backends) at the bench's
  resolution and view count, meshes dropped: small enough to carry to the GPU machine;
- `draw` (GPU): the held-out split (`data.holdout_fraction`, a hash of the sample id, as training
  uses), then three models, each drawing every held-out row from its own reference views and
  caption (`RefAny3DPipeline.generate`, the train flow's held-out path): the model at step 0, after
  `--seconds` of training, and the ablation: the same model, seed and number of steps trained on
  the shards with blank reference point maps (black, what reference dropout trains on), drawing
  with blank ones. Writes the samples (one tar) and the runs' facts;
- `score` (CPU, here): the weight-free geometric metrics of each model's samples against the
  build's meshes (`silhouette_iou`, `surface_distance`, `texture_error`; `refany3d evaluate`'s
  code), the verdict against the margins stated here in advance (`MARGINS`), a contact sheet
  (views | generated RGB | generated point map; step 0, trained, ablation side by side) and the
  numbers (`metrics.step0 / trained / ablation`: the three means, a sample without a value at its
  chance value; `scored_only`: how many samples each metric scored and their plain mean;
  `higher_is_better`).

Usage:
  python bench/learn_bench.py slim --data BUILD --out SLIM [--resolution 32 --views 4]
  python bench/learn_bench.py draw --data SLIM --out OUTDIR [--seconds 150 --size small]
  python bench/learn_bench.py score --draw OUTDIR --data BUILD --out bench/results/learn_h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from refany3d.config import EvaluateSettings, ModelSettings, TrainSettings, load_settings
from refany3d.models.flux.components import cast_module, load_components, wrap_transformer
from refany3d.storage.shards import list_tables, read_rows, write_shard
from refany3d.train import data as data_mod
from refany3d.train.trainer import build_trainer, make_loader, train_step

METRICS = ("silhouette_iou", "surface_distance", "texture_error")
HIGHER_IS_BETTER = {"silhouette_iou": True, "surface_distance": False, "texture_error": False}
# Stated before the run: how much better the trained model must be than its step-0 self, and than
# the ablation (absolute for silhouette_iou, relative to the other's value for the distances).
MARGINS = {
    "vs_step0": {"silhouette_iou": 0.10, "surface_distance": 0.25, "texture_error": 0.10},
    "vs_ablation": {"silhouette_iou": 0.0, "surface_distance": 0.10, "texture_error": 0.0},
}
SIZES = {
    "tiny": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 4,
             "axes_dims_rope": (4, 4, 8)},
    "small": {"num_layers": 4, "num_single_layers": 8, "attention_head_dim": 64, "num_attention_heads": 6,
              "axes_dims_rope": (16, 24, 24)},
}  # fmt: skip


class PatchVAE(nn.Module):
    """A lossless stand-in for FLUX's VAE with its interface: (B, 3, H, W) -> 2x2 pixel unshuffle
    (12 channels) + 4 zero channels = (B, 16, H/2, W/2) latents; decode takes the 12 back."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # device / dtype of the "VAE"
        self.config = SimpleNamespace(block_out_channels=(1, 1), shift_factor=0.0, scaling_factor=1.0)

    def encode(self, x: torch.Tensor):
        z = F.pad(F.pixel_unshuffle(x, 2), (0, 0, 0, 0, 0, 4))
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: z))

    def decode(self, z: torch.Tensor):
        return SimpleNamespace(sample=F.pixel_shuffle(z[:, :12], 2))


def settings_for(args: argparse.Namespace, shards: str, out: str) -> TrainSettings:
    values = {
        "data.shards": shards, "data.cache": out + "-cache", "data.resolution": args.resolution,
        "data.condition_resolution": args.resolution, "data.holdout_fraction": args.holdout,
        "data.num_workers": args.workers, "model.num_views": args.views, "model.attention": "grouped",
        "model.train_base": True,
        "model.gradient_checkpointing": False, "optim.optimizer": "adamw", "optim.lr": args.lr,
        "optim.warmup_steps": 50, "optim.batch_size": args.batch, "optim.steps": 10**9,
        "checkpoint.dir": out, "checkpoint.sample_steps": args.sample_steps,
        "runtime.device": args.device, "runtime.dtype": args.dtype, "retrain.eval_samples": args.eval,
    }  # fmt: skip
    return load_settings(TrainSettings, None, {k: str(v) for k, v in values.items()}, environ={})


def components_for(args: argparse.Namespace, model: ModelSettings):
    """The small network (random init, every weight trainable), PatchVAE, the tiny text encoders."""
    from diffusers import FluxTransformer2DModel

    base = load_components(ModelSettings(), args.device, getattr(torch, args.dtype))  # text encoders
    torch.manual_seed(args.seed)
    flux = FluxTransformer2DModel(
        patch_size=1, in_channels=64, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        **SIZES[args.size],
    )  # fmt: skip
    flux = cast_module(flux, args.device, getattr(torch, args.dtype))
    transformer = wrap_transformer(flux, model)  # model.train_base: every weight trains
    vae = PatchVAE().to(args.device, getattr(torch, args.dtype))
    return dataclasses.replace(
        base,
        transformer=transformer,
        vae=vae,
        label=f"learn_bench {args.size} RefAny3D from scratch (random init, PatchVAE)",
        identity=f"learn-bench-{args.size}-{args.seed}",
    )


def slim(build: str, out: Path, resolution: int, views: int) -> dict:
    """The training columns of the build's shards at `resolution` px (resized as training's
    decoder resizes, so it reads them unchanged) and `views` views; no meshes."""
    from refany3d.records import image_cell

    def png(cell: dict) -> dict:
        image = Image.open(io.BytesIO(cell["bytes"])).convert("RGB")
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=True)
        return image_cell(buf.getvalue())

    columns = ["sample_id", "caption", "image", "point_map", "views_rgb", "views_point_map"]
    count = 0
    for table in list_tables(build):
        rows = []
        for row in read_rows([table], columns=columns):
            if not row.get("image") or len(row.get("views_rgb") or []) < views:
                continue
            rows.append({"sample_id": row["sample_id"], "caption": row["caption"], "image": png(row["image"]),
                         "point_map": png(row["point_map"]),
                         "views_rgb": [png(c) for c in row["views_rgb"][:views]],
                         "views_point_map": [png(c) for c in row["views_point_map"][:views]]})  # fmt: skip
        write_shard(str(out), Path(table).stem, rows, columns)
        count += len(rows)
    return {"samples": count, "bytes": sum(p.stat().st_size for p in (out / "data").glob("*.parquet"))}


def blank_point_map_copy(dataset: str, root: Path) -> str:
    """The dataset (a directory holding data/) with every reference point map replaced by a black
    view: the ablation's data."""
    black = io.BytesIO()
    Image.new("RGB", (8, 8)).save(black, format="PNG")
    cell = {"bytes": black.getvalue(), "path": None}
    tables = list_tables(dataset)
    assert tables, f"no shards under {dataset}/data"
    for table in tables:
        rows = list(read_rows([table]))
        columns = list(rows[0])
        for row in rows:
            row["views_point_map"] = [cell for _ in row.get("views_point_map") or []]
        write_shard(str(root), Path(table).stem, rows, columns)
    return str(root)


def train(settings: TrainSettings, components, seconds: float, steps: int) -> dict:
    """Train until `steps` or `seconds` run out; the losses and the steps done."""
    tr = build_trainer(settings, components)
    stream = iter(make_loader(tr))
    losses, start = [], time.perf_counter()
    while tr.step < steps and time.perf_counter() - start < seconds:
        row = train_step(tr, [next(stream)])
        if row is not None:
            losses.append(row["loss"])
    elapsed = time.perf_counter() - start
    return {"steps": tr.step, "seconds": elapsed, "first_loss": losses[0] if losses else None,
            "last_loss": float(np.mean(losses[-20:])) if losses else None}  # fmt: skip


def held_out(settings: TrainSettings, limit: int) -> list:
    """Up to `limit` held-out rows (by sample id), decoded: what each model draws."""
    files = data_mod.shard_files(settings.data.shards)
    groups = data_mod.build_index(files, settings.data.holdout_fraction, evaluation=True)
    refs = sorted((r for g in groups for r in g), key=lambda r: r.sample_id)[:limit]
    reader = data_mod._GroupReader()
    return [data_mod.decode_row(reader.row(r), settings.data, settings.model.num_views) for r in refs]


def draw_samples(components, settings: TrainSettings, samples: list, out: Path) -> None:
    """Each held-out sample drawn from its own views and caption, written as `refany3d sample`
    writes one (image.png, point_map.png, views/, sample.json with its sample_id)."""
    from refany3d.evaluate.heldout import generate, heldout_pipeline, row_views
    from refany3d.sampling.sheet import to_uint8

    pipe = heldout_pipeline(settings, components)
    for raw in samples:
        image, point_map = generate(pipe, raw, settings.optim.seed)
        views = row_views(raw)
        directory = out / raw.sample_id
        (directory / "views").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(directory / "image.png")
        Image.fromarray(to_uint8(point_map)).save(directory / "point_map.png")
        for k, (rgb, pm) in enumerate(zip(views.rgb, views.point_maps)):
            Image.fromarray(rgb).save(directory / "views" / f"rgb_{k:02d}.png")
            Image.fromarray(to_uint8(pm)).save(directory / "views" / f"point_map_{k:02d}.png")
        meta = {"sample_id": raw.sample_id, "prompt": raw.caption, "seed": settings.optim.seed}
        (directory / "sample.json").write_text(json.dumps(meta, sort_keys=True))


def draw(args: argparse.Namespace) -> None:
    import tarfile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 GEMMs for the float32 model
    shards = str(Path(args.data) / "data")
    work = Path(tempfile.mkdtemp(prefix="learn-bench-"))
    samples_dir = work / "samples"
    settings = settings_for(args, shards, str(work / "run"))
    samples = held_out(settings, args.eval)
    started = time.perf_counter()
    runs = {}
    model = components_for(args, settings.model)
    if args.models in ("all", "trained"):
        runs["step0"] = {"steps": 0}
        draw_samples(model, settings, samples, samples_dir / "step0")
        runs["trained"] = train(settings, model, args.seconds, args.steps)
        draw_samples(model, settings, samples, samples_dir / "trained")
    if args.models in ("all", "ablation"):
        blank = blank_point_map_copy(args.data, work / "ablation")
        ablation_settings = settings_for(args, str(Path(blank) / "data"), str(work / "ablation-run"))
        blank_samples = held_out(ablation_settings, args.eval)
        assert [s.sample_id for s in blank_samples] == [s.sample_id for s in samples]
        ablation = components_for(args, settings.model)
        # the same number of steps as the trained model: its run here, or --steps from its call
        steps, seconds = (
            (runs["trained"]["steps"], 10 * args.seconds) if "trained" in runs else (args.steps, args.seconds)
        )
        runs["ablation"] = train(ablation_settings, ablation, seconds, steps)
        draw_samples(ablation, ablation_settings, blank_samples, samples_dir / "ablation")
    with tarfile.open(out / "samples.tar", "w") as tar:
        tar.add(samples_dir, arcname="samples")
    facts = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"host": platform.node(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
        "args": vars(args),
        "model": {"size": SIZES[args.size], "label": model.label, "vae": "PatchVAE (lossless 2x2 pixel unshuffle)",
                  "parameters": sum(p.numel() for p in model.transformer.parameters())},
        "samples": {"train": sum(len(g) for g in data_mod.build_index(data_mod.shard_files(shards), args.holdout)),
                    "held_out_drawn": len(samples)},
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }  # fmt: skip
    (out / "runs.json").write_text(json.dumps(facts, indent=2, sort_keys=True, default=str))
    print(json.dumps(facts["runs"], indent=2))


def score(args: argparse.Namespace) -> None:
    """Metrics of the drawn samples against the build's meshes, verdict, contact sheet, JSON."""
    import tarfile

    from refany3d.evaluate.run import build_report, dataset_rows, evaluate_sample, read_sample
    from refany3d.sampling.sheet import contact_sheet

    work = Path(tempfile.mkdtemp(prefix="learn-score-"))
    calls = []
    for draw_dir in args.draw:  # one draw call, or the trained and the ablation call
        with tarfile.open(Path(draw_dir) / "samples.tar") as tar:
            tar.extractall(work, filter="data")
        calls.append(json.loads((Path(draw_dir) / "runs.json").read_text()))
    facts = merge_calls(calls)
    results, scored, sheets, rows, chance = {}, {}, {}, None, {}
    for model in ("step0", "trained", "ablation"):
        paths = sorted((work / "samples" / model).iterdir())
        if rows is None:
            ids = {json.loads((p / "sample.json").read_text())["sample_id"] for p in paths}
            rows = dataset_rows(args.data, ids)
        per_sample, sheets[model] = {}, []
        for path in paths:
            sample = read_sample(path, rows)
            per_sample[sample.name] = evaluate_sample(sample, EvaluateSettings(), {})
            if sample.name not in chance:
                chance[sample.name] = chance_values(sample.mesh)
            if len(sheets[model]) < 4:
                pms = [
                    np.asarray(Image.open(v), dtype=np.float32) / 255.0
                    for v in sorted((path / "views").glob("point_map_*.png"))
                ]
                sheets[model].append(contact_sheet(sample.views, pms, sample.image, sample.point_map))  # fmt: skip
        report = build_report(per_sample, [], EvaluateSettings())
        results[model] = chance_filled_means(report["samples"], chance)  # the three means only
        scored[model] = {
            "count": {m: report["count"].get(m) for m in METRICS},
            "mean": {m: report["mean"].get(m) for m in METRICS},
        }
    checks = verdict(results)
    sheet = Path(args.sheet) if args.sheet else Path(args.out).with_suffix(".png")
    columns = [np.concatenate(sheets[k], axis=0) for k in ("step0", "trained", "ablation")]
    Image.fromarray(np.concatenate(columns, axis=1)).save(sheet)
    report = {"bench": "learn_bench", **facts, "metrics": results, "scored_only": scored, "higher_is_better": HIGHER_IS_BETTER,
              "margins": MARGINS, "checks": checks, "passed": all(checks.values()), "sheet": str(sheet)}  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    print(json.dumps({"metrics": results, "checks": checks, "passed": report["passed"]}, indent=2))


def chance_values(mesh, points: int = 4096, seed: int = 0) -> dict[str, float]:
    """What a sample without a value for a metric counts as in the verdict: the value of a model
    that draws noise (no object: IoU 0; coordinates uniform in the asset's bounding box, their
    distance to its surface; uniform colours against its texture there). The metrics give such a
    point map no value at all (it has no foreground), so the means over scored samples alone
    would compare a model with the few samples it got right."""
    from refany3d.evaluate.geometry import surface_distance, texture_error

    rng = np.random.default_rng(seed)
    lo, hi = mesh.bounds
    coords = lo + rng.random((points, 3)) * (hi - lo)
    colors = rng.integers(0, 256, (points, 3))
    return {"silhouette_iou": 0.0, "surface_distance": surface_distance(coords, mesh),
            "texture_error": texture_error(coords, colors, mesh)}  # fmt: skip


def chance_filled_means(samples: dict[str, dict], chance: dict[str, dict]) -> dict[str, float]:
    """Each metric's mean over every sample, a sample without a value counting at its chance value."""
    return {
        m: float(np.mean([v[m] if v.get(m) is not None else chance[name][m] for name, v in samples.items()]))
        for m in METRICS
    }


def merge_calls(calls: list[dict]) -> dict:
    """One run's facts from the draw calls that made it: their runs together, each call's own
    facts under `calls`. The ablation must have trained as many steps as the trained model."""
    runs = {k: v for call in calls for k, v in call["runs"].items()}
    missing = {"step0", "trained", "ablation"} - set(runs)
    assert not missing, f"no draw call made {sorted(missing)}"
    assert runs["ablation"]["steps"] == runs["trained"]["steps"], (
        "the ablation must train the trained model's steps"
    )
    merged = {**calls[0], "runs": runs, "seconds": sum(c["seconds"] for c in calls)}
    if len(calls) > 1:
        merged["calls"] = [{k: c[k] for k in ("when", "args", "seconds", "runs")} for c in calls]
    return merged


def verdict(results: dict) -> dict:
    out = {}
    for other, margins in MARGINS.items():
        base = results["step0" if other == "vs_step0" else "ablation"]
        for m, margin in margins.items():
            a, b = results["trained"][m], base[m]
            if a is None or b is None or math.isnan(a) or math.isnan(b):
                out[f"{other}.{m}"] = False
                continue
            gain = a - b if HIGHER_IS_BETTER[m] else b - a
            need = margin if m == "silhouette_iou" else margin * abs(b)
            out[f"{other}.{m}"] = bool(gain > need)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="phase", required=True)
    s = sub.add_parser("slim", help="the build's training columns, small (CPU)")
    s.add_argument("--data", required=True, help="the build directory (refany3d build --out)")
    s.add_argument("--out", required=True, help="the slim dataset directory")
    s.add_argument("--resolution", type=int, default=32)
    s.add_argument("--views", type=int, default=4)
    d = sub.add_parser("draw", help="train step 0 / trained / ablation, draw the held-out rows (GPU)")
    d.add_argument("--data", required=True, help="the slim dataset directory")
    d.add_argument("--out", required=True, help="directory for samples.tar and runs.json")
    d.add_argument("--size", choices=sorted(SIZES), default="small")
    d.add_argument("--seconds", type=float, default=150.0, help="training wall time of each model")
    d.add_argument("--steps", type=int, default=10**9, help="at most this many steps per model")
    d.add_argument("--eval", type=int, default=64, help="held-out assets drawn (>= 50 for the check)")
    d.add_argument("--holdout", type=float, default=0.05)
    d.add_argument("--resolution", type=int, default=32, help="= slim's")
    d.add_argument("--views", type=int, default=4, help="= slim's")
    d.add_argument("--batch", type=int, default=32)
    d.add_argument("--lr", type=float, default=3e-4)
    d.add_argument("--sample-steps", type=int, default=20)
    d.add_argument("--workers", type=int, default=4)
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--dtype", default="float32", help="float32: the base trains (model.train_base)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--models", choices=("all", "trained", "ablation"), default="all",
                   help="trained: step 0 and the trained model; ablation: the ablation alone, for --steps "
                        "(the trained call's) within --seconds; two calls when one cannot hold both")  # fmt: skip
    c = sub.add_parser("score", help="metrics, verdict, contact sheet, results JSON (CPU)")
    c.add_argument(
        "--draw", required=True, nargs="+", help="draw's --out (samples.tar, runs.json), one per call"
    )
    c.add_argument("--data", required=True, help="the build directory (its meshes)")
    c.add_argument("--out", required=True, help="results JSON")
    c.add_argument("--sheet", help="contact sheet PNG (default: beside --out)")
    args = p.parse_args()
    if args.phase == "slim":
        print(json.dumps(slim(args.data, Path(args.out), args.resolution, args.views)))
    elif args.phase == "draw":
        draw(args)
    else:
        score(args)


if __name__ == "__main__":
    main()
