"""Benchmark of the training loop: seconds per step of the whole loop vs the model step alone, and
the cost of encoding a sample on the fly (what the latent cache saves).

Full-size FLUX.1-dev dimensions with random weights, bf16, at the paper's token budget (512 text +
2 x 1024 target + 16 x 1024 condition tokens = 18,944; 512 px targets and 8 orbit views of RGB +
point map). Components are the real classes built at full size on the GPU: the RefAny3D transformer
(19 + 38 blocks, 24 x 128), FLUX.1-dev's VAE, T5-XXL (24 layers, 4096) and CLIP-L (12 layers, 768).
The tokenizers are the embedded character ones (same padded token counts, so the same encoder cost).

- encode: per sample, the VAE on its 18 images + T5 + CLIP on its caption (after one warm-up sample);
  this also fills the latent cache.
- model step: `flow_matching_losses` + backward + clip + Prodigy step on one fixed batch on the GPU.
- loop: `train_step` on micro-batches from the data stream (Parquet shards, 2 loader workers, cached
  encodings read from the store, moved to the GPU, dropout, per-position noise).

Modes (issue #26), each timed the same way; the top-level figures are the baseline:
- baseline: bf16 base, prodigyopt's own Prodigy step (`optim.optimizer=prodigyopt`): today's figures.
- `modes.fused_prodigy`: the same model, the fused Prodigy step (`optim.optimizer=prodigy`).
- `modes.fp8_flex`: `model.fp8_base=true` (FP8 frozen token linears) + the fused Prodigy step,
  compiled flex attention (the default attention), a fresh model.
- `modes.fp8_base`: the same with the "grouped" attention (three batched SDPA calls, their outputs
  kept through checkpointing) on cuDNN's fused attention (`model.sdpa_kernel=cudnn`): the fastest
  configuration with `fp8_base` and the fused optimizer (issue #26's target mode).
Each mode also reports `step_peak_gib`: the peak GPU memory of its model steps alone (its
`peak_gib` counts from its build on, which holds the bf16 weights while FP8 copies are made).
- `modes.fp8_agreement` (`--agreement-steps N`, 0 = off): "no loss in what is learnt". The same
  configuration trained twice from the same seed (adapter init, sample order, dropout and noise are
  functions of the seed and the sample position), with and without `fp8_base`, through
  `train_step` on the bench's data: FLUX.1-dev's block dimensions (24 x 128, the real linear
  shapes and the paper's 18,944 tokens) with `--agreement-blocks D,S` double/single blocks, fused
  Prodigy; `--agreement-sdpa cudnn` runs the FP8 side as `fp8_base` does (grouped attention on
  cuDNN) against today's bf16 flex, so that the whole new configuration is compared; the two runs step in turn, so `--deadline-s` cuts both at the same step. Both loss
  curves are written. Tolerance, stated before any run: the median over steps
  of |loss_fp8 - loss_bf16| / loss_bf16 <= 2%, and the mean losses of the last half of the steps
  within 1% of each other (`pass`).

Usage: python bench/train_bench.py --out results.json [--tiny] [--steps 6] [--modes baseline,fp8_base]
       [--agreement-steps 100 --agreement-blocks 2,4]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import io
import json
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from refany3d.config import TrainSettings, load_settings, override
from refany3d.models.flux.attention import preferred_sdpa
from refany3d.models.flux.components import (
    FLUX_SCHEDULER_CONFIG,
    FluxComponents,
    load_components,
    tiny_tokenizer,
    wrap_transformer,
)
from refany3d.models.flux.loss import flow_matching_losses
from refany3d.records import image_cell
from refany3d.storage.shards import write_shard
from refany3d.train import data as data_mod
from refany3d.train.encode import encode_sample
from refany3d.train.trainer import (
    build_optimizer,
    build_trainer,
    make_loader,
    prepare_micro_batch,
    train_step,
)

FULL_FLUX = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}  # fmt: skip
FULL_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
}  # fmt: skip
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}  # fmt: skip
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "max_position_embeddings": 77, "projection_dim": 768, "hidden_act": "quick_gelu"}  # fmt: skip


def full_components(settings: TrainSettings, device: torch.device, **flux_overrides) -> FluxComponents:
    """FLUX.1-dev-sized components with random weights, initialised on the device in bf16
    (`flux_overrides`: e.g. fewer blocks, for the loss-agreement runs)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok, tok2 = tiny_tokenizer(bos=True), tiny_tokenizer(bos=False)
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    torch.manual_seed(0)
    with torch.device(device):
        flux = FluxTransformer2DModel(**{**FULL_FLUX, **flux_overrides}).to(torch.bfloat16)
        vae = AutoencoderKL(**FULL_VAE).to(torch.bfloat16)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), **ids, **CLIP_L)).to(torch.bfloat16)
        t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), pad_token_id=0, eos_token_id=3, **T5_XXL))
        t5 = t5.to(torch.bfloat16)
    for m in (vae, clip, t5):
        m.eval().requires_grad_(False)
    return FluxComponents(
        transformer=wrap_transformer(flux, settings.model),
        vae=vae,
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tok2,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        label="full-size FLUX.1-dev dimensions, random weights (benchmark)",
        identity="bench-random-full",
        text_tokens=512,
    )


def _png(rng: np.random.Generator, size: int) -> bytes:
    """A smooth random image (upsampled noise): realistic PNG size, any content costs the same."""
    small = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((size, size), Image.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(root: Path, n: int, size: int, views: int) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        rows.append(
            {
                "sample_id": f"bench-{i:04d}",
                "caption": "A ceramic mug photographed against a softly lit studio backdrop, its pattern visible.",
                "image": image_cell(_png(rng, size)),
                "point_map": image_cell(_png(rng, size)),
                "views_rgb": [image_cell(_png(rng, size)) for _ in range(views)],
                "views_point_map": [image_cell(_png(rng, size)) for _ in range(views)],
            }
        )
    columns = ["sample_id", "caption", "image", "point_map", "views_rgb", "views_point_map"]
    write_shard(str(root), "bench", rows, columns)
    return root


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def encode_cost(tr, n: int) -> dict:
    """Seconds per sample to encode on the fly (VAE 18 images, T5, CLIP), split by encoder."""
    from refany3d.models.flux.components import encode_images, encode_prompts

    reader = data_mod._GroupReader()
    refs = [r for g in tr.groups for r in g][:n]
    raws = [data_mod.decode_row(reader.row(r), tr.settings.data, tr.settings.model.num_views) for r in refs]
    keys = [tr_key(tr, reader.row(r)) for r in refs]
    c = tr.components
    encode_sample(c, raws[0])  # warm-up
    whole, vae, text = [], [], []
    for raw, key in zip(raws, keys):
        whole.append(_timed(lambda raw=raw, key=key: tr.cache.put(key, encode_sample(c, raw))))
        images = torch.cat([raw.image[None], raw.point_map[None], raw.views_rgb, raw.views_point_map])
        vae.append(_timed(lambda images=images: encode_images(c, images)))
        text.append(_timed(lambda raw=raw: encode_prompts(c, [raw.caption])))
    return {
        "samples": len(raws),
        "images_per_sample": 2 + 2 * tr.settings.model.num_views,
        "encode_and_store_s": statistics.median(whole),
        "vae_s": statistics.median(vae),
        "t5_clip_s": statistics.median(text),
    }


def tr_key(tr, row: dict) -> str:
    from refany3d.train.encode import cache_key

    return cache_key(data_mod.content_key(row, tr.settings.model.num_views), tr.preprocessing)


def model_step_times(tr, warmup: int, steps: int) -> list[float]:
    """The model step alone on one fixed batch: forward + backward + clip + optimizer step."""
    stream = iter(make_loader(tr))
    batch, noise, _ = prepare_micro_batch(tr, next(stream))
    params = [p for p in tr.model.parameters() if p.requires_grad]

    def step():
        with preferred_sdpa(tr.settings.model.sdpa_kernel):  # as train_step holds it
            loss = sum(flow_matching_losses(tr.model, batch, noise=noise))
            tr.accelerator.backward(loss)
        tr.accelerator.clip_grad_norm_(params, tr.settings.optim.grad_clip)
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    return [_timed(step) for _ in range(steps)]


def loop_step_times(tr, steps: int) -> list[float]:
    """`train_step` on the data stream (cache hits), as run_training calls it."""
    stream = iter(make_loader(tr))
    train_step(tr, [next(stream)])  # loader workers start
    times = []
    for _ in range(steps):
        times.append(_timed(lambda: train_step(tr, [next(stream)])))
    return times


AGREEMENT_MEDIAN_RTOL = 0.02  # median over steps of |loss_fp8 - loss_bf16| / loss_bf16
AGREEMENT_TAIL_RTOL = 0.01  # mean loss of the last half of the steps, fp8 against bf16
MODES = ("baseline", "fused_prodigy", "fp8_flex", "fp8_base")
CUDNN_ATTENTION = {"model.attention": "grouped", "model.sdpa_kernel": "cudnn"}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _gib(fn) -> float | None:
    return fn() / 2**30 if torch.cuda.is_available() else None


def _build(settings: TrainSettings, cuda: bool, **flux_overrides):
    if cuda:
        components = full_components(settings, torch.device("cuda"), **flux_overrides)
    else:
        components = load_components(settings.model)
    return build_trainer(settings, components)


def _use_optimizer(tr, name: str) -> None:
    """Swap the trainer's optimizer (the model and its compiled blocks stay)."""
    from refany3d.train.trainer import build_lr_scheduler

    optim = dataclasses.replace(tr.settings.optim, optimizer=name)
    params = [p for p in tr.model.parameters() if p.requires_grad]
    tr.optimizer = build_optimizer(params, optim)
    tr.lr_scheduler = build_lr_scheduler(tr.optimizer, optim.warmup_steps)
    tr.settings = dataclasses.replace(tr.settings, optim=optim)


def _timings(tr, steps: int, loop: bool = True) -> dict:
    peak_so_far = _gib(torch.cuda.max_memory_allocated)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = model_step_times(tr, warmup=2, steps=steps)
    out = {
        "optimizer": type(tr.optimizer).__name__,
        "model_step_s": {"median": statistics.median(model), "all": model},
    }
    out["step_peak_gib"] = _gib(torch.cuda.max_memory_allocated)
    out["peak_gib"] = None if peak_so_far is None else max(peak_so_far, out["step_peak_gib"])
    if loop:
        times = loop_step_times(tr, steps)
        out["loop_step_s"] = {"median": statistics.median(times), "all": times}
        out["loop_over_model"] = statistics.median(times) / statistics.median(model)
    return out


@contextlib.contextmanager
def _recorded(mode: dict, save):
    """Run one mode; an exception is written into its entry (the next mode still runs)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - a bench records what failed and goes on
        mode["error"] = "".join(traceback.format_exception_only(exc)).strip()
        traceback.print_exc()
    save()


def _fp8_linears(tr) -> int:
    from refany3d.models.flux.fp8 import Float8Linear

    return sum(isinstance(m, Float8Linear) for m in tr.model.modules())


def loss_agreement(
    settings: TrainSettings,
    cuda: bool,
    steps: int,
    blocks: tuple[int, int],
    deadline: float = float("inf"),
    fp8_attention: dict | None = None,
) -> dict:
    """The same run with and without fp8_base (same seed, data, dropout and noise): both curves.
    The two runs step in turn, so that a `deadline` (perf_counter) cuts both at the same step
    (after at least 10). `fp8_attention`: settings of the FP8 run's attention (default: the same)."""
    requested, runs, linears = steps, {}, {}
    for name, fp8 in (("bf16", False), ("fp8", True)):
        extra = (fp8_attention or {}) if fp8 else {}
        run = override(settings, **{"model.fp8_base": fp8, "optim.optimizer": "prodigy", **extra})
        tr = _build(run, cuda, num_layers=blocks[0], num_single_layers=blocks[1])
        linears[name] = _fp8_linears(tr)
        runs[name] = (tr, iter(make_loader(tr)))
    curves = {name: [] for name in runs}
    for step in range(steps):
        if step >= 10 and time.perf_counter() > deadline:
            break
        for name, (tr, stream) in runs.items():
            curves[name].append(train_step(tr, [next(stream)])["loss"])
    del runs, tr, stream
    _free()
    steps = len(curves["bf16"])
    rel = [abs(a - b) / b for a, b in zip(curves["fp8"], curves["bf16"])]
    half = steps // 2
    tail = {k: statistics.fmean(v[half:]) for k, v in curves.items()}
    tail_rel = abs(tail["fp8"] - tail["bf16"]) / tail["bf16"]
    median = statistics.median(rel)
    return {
        "steps": steps,
        "stopped_at_deadline": steps < requested,
        "blocks": {"double": blocks[0], "single": blocks[1]},
        "fp8_attention": fp8_attention or "as bf16",
        "fp8_linears": linears,
        "tolerance": {"median_step_rel": AGREEMENT_MEDIAN_RTOL, "tail_mean_rel": AGREEMENT_TAIL_RTOL},
        "median_step_rel": median,
        "max_step_rel": max(rel),
        "tail_mean": tail,
        "tail_mean_rel": tail_rel,
        "pass": median <= AGREEMENT_MEDIAN_RTOL and tail_rel <= AGREEMENT_TAIL_RTOL,
        "loss": curves,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU validation with the tiny model at 32 px")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument(
        "--agreement-steps", type=int, default=0, help="loss-agreement steps per run (0 = off)"
    )
    parser.add_argument(
        "--agreement-blocks", default="2,4", help="double,single blocks of the agreement runs"
    )
    parser.add_argument(
        "--agreement-sdpa",
        choices=("flash", "cudnn"),
        default="flash",
        help="cudnn: the FP8 run of the agreement uses fp8_base's attention (grouped on cuDNN)",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=0,
        help="end the agreement runs this long after the start (0 = never)",
    )
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if unknown := sorted(set(modes) - set(MODES)):
        parser.exit(2, f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}\n")
    cuda = not args.tiny
    size = 32 if args.tiny else 512
    tmp = Path(tempfile.mkdtemp(prefix="train-bench-"))
    root = write_dataset(tmp / "dataset", args.samples, size, 8)
    dotted = {
        "data.shards": str(root), "data.resolution": size, "data.condition_resolution": size,
        "data.num_workers": 2, "checkpoint.dir": str(tmp / "out"),
        "runtime.device": "cuda" if cuda else "cpu", "runtime.dtype": "bfloat16" if cuda else "float32",
        "model.attention": "flex" if cuda else "grouped", "optim.optimizer": "prodigyopt",
    }  # fmt: skip
    settings = load_settings(TrainSettings, None, {k: str(v) for k, v in dotted.items()}, environ={})
    started = time.perf_counter()
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "tokens": {"text": None, "target": 2 * (size // 16) ** 2, "cond": 16 * (size // 16) ** 2},
        "optimizer": "prodigyopt",
        "modes": {},
    }

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))

    tr = None
    if {"baseline", "fused_prodigy"} & set(modes):
        tr = _build(settings, cuda)
        results["build_s"] = time.perf_counter() - started
        results["base"], results["tokens"]["text"] = tr.components.label, tr.components.text_tokens
        results["encode"] = encode_cost(tr, args.samples)  # also fills the latent cache
        save()
        if "baseline" in modes:
            base = _timings(tr, args.steps)
            results.update({k: v for k, v in base.items() if k != "optimizer"}, counts=dict(tr.counts))
            save()
        if "fused_prodigy" in modes:
            mode = results["modes"]["fused_prodigy"] = {}
            with _recorded(mode, save):
                _use_optimizer(tr, "prodigy")
                mode.update(_timings(tr, args.steps))
        del tr
        _free()
    for name in ("fp8_flex", "fp8_base"):
        if name not in modes:
            continue
        mode = results["modes"][name] = {}
        with _recorded(mode, save):
            attention = CUDNN_ATTENTION if name == "fp8_base" else {}
            fp8_settings = override(
                settings, **{"model.fp8_base": True, "optim.optimizer": "prodigy", **attention}
            )
            built = time.perf_counter()
            tr = _build(fp8_settings, cuda)
            mode.update(build_s=time.perf_counter() - built, fp8_linears=_fp8_linears(tr))
            mode["attention"] = attention or {"model.attention": "flex"}
            mode["resident_gib"] = _gib(torch.cuda.memory_allocated)
            if "encode" not in results:
                results["encode"] = encode_cost(tr, args.samples)
            save()
            mode.update(_timings(tr, args.steps))
        tr = None
        _free()
    if args.agreement_steps:
        blocks = tuple(int(b) for b in args.agreement_blocks.split(","))
        deadline = started + args.deadline_s if args.deadline_s else float("inf")
        mode = results["modes"]["fp8_agreement"] = {}
        with _recorded(mode, save):
            attention = CUDNN_ATTENTION if args.agreement_sdpa == "cudnn" else None
            mode.update(loss_agreement(settings, cuda, args.agreement_steps, blocks, deadline, attention))
    results["total_s"] = time.perf_counter() - started
    save()
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
