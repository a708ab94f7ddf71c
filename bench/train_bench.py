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

Usage: python bench/train_bench.py --out results.json [--tiny] [--steps 6]
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from refany3d.config import TrainSettings, load_settings
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
from refany3d.train.trainer import build_trainer, make_loader, prepare_micro_batch, train_step

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


def full_components(settings: TrainSettings, device: torch.device) -> FluxComponents:
    """FLUX.1-dev-sized components with random weights, initialised on the device in bf16."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok, tok2 = tiny_tokenizer(bos=True), tiny_tokenizer(bos=False)
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    torch.manual_seed(0)
    with torch.device(device):
        flux = FluxTransformer2DModel(**FULL_FLUX).to(torch.bfloat16)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU validation with the tiny model at 32 px")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--samples", type=int, default=6)
    args = parser.parse_args()
    cuda = not args.tiny
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN attention fails on the bench machine
    size = 32 if args.tiny else 512
    tmp = Path(tempfile.mkdtemp(prefix="train-bench-"))
    root = write_dataset(tmp / "dataset", args.samples, size, 8)
    dotted = {
        "data.shards": str(root), "data.resolution": size, "data.condition_resolution": size,
        "data.num_workers": 2, "checkpoint.dir": str(tmp / "out"),
        "runtime.device": "cuda" if cuda else "cpu", "runtime.dtype": "bfloat16" if cuda else "float32",
        "model.attention": "flex" if cuda else "grouped",
    }  # fmt: skip
    settings = load_settings(TrainSettings, None, {k: str(v) for k, v in dotted.items()}, environ={})
    started = time.perf_counter()
    if cuda:
        components = full_components(settings, torch.device("cuda"))
    else:
        components = load_components(settings.model)
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "base": components.label,
        "tokens": {
            "text": components.text_tokens,
            "target": 2 * (size // 16) ** 2,
            "cond": 16 * (size // 16) ** 2,
        },
        "optimizer": settings.optim.optimizer,
        "build_s": time.perf_counter() - started,
    }

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))

    tr = build_trainer(settings, components)
    results["encode"] = encode_cost(tr, args.samples)
    save()
    model = model_step_times(tr, warmup=2, steps=args.steps)
    results["model_step_s"] = {"median": statistics.median(model), "all": model}
    if cuda:
        results["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    save()
    loop = loop_step_times(tr, args.steps)
    results["loop_step_s"] = {"median": statistics.median(loop), "all": loop}
    results["loop_over_model"] = statistics.median(loop) / statistics.median(model)
    results["counts"] = dict(tr.counts)
    save()
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
