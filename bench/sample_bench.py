"""Benchmark of RefAny3D sampling: seconds per image for 28 Euler steps, with and without the
condition KV cache, at the paper's token budget (512 text + 2 x 1024 target + 16 x 1024 condition
tokens, 8 views at 512 px), full-size FLUX.1-dev dimensions, random weights, bf16, batch 1.

Modes (the transformer only; text encoders and the VAE are not timed):
- paper_group_mask: the paper's attention (conditions see text and targets), flex group mask,
  compiled blocks: every step runs all 18,944 tokens.
- independent_uncached: independent conditions (a condition sees its own view pair only), the
  same full pass every step.
- independent_cached: independent conditions; condition keys/values computed once per image
  (`encode_conditions`), each step runs the 2,560 text + target tokens against them.
- dense_flux: a plain `FluxTransformer2DModel` forward over all 18,944 tokens, no mask.
Uncached modes time `--timed-steps` steps after 2 warm-up steps and report s/step and x28; the
cached mode times whole 28-step images (cache included) after a warm-up image.

Usage: python bench/sample_bench.py --out results.json [--tiny]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from flux_bench import FULL_FLUX_CONFIG

from refany3d.models.flux import RefAny3DTransformer
from refany3d.models.flux.positions import TokenLayout, token_ids
from refany3d.models.flux.sampler import Conditions, sample_latents
from refany3d.models.flux.transformer import TINY_FLUX_CONFIG

STEPS = 28


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _inputs(dims, text, target_hw, cond_hw, views, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    c, lc = dims["in_channels"], cond_hw[0] * cond_hw[1]

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    conds = Conditions(randn(1, views, lc, c), randn(1, views, lc, c), cond_hw)
    return randn(1, text, dims["joint_attention_dim"]), randn(1, dims["pooled_projection_dim"]), conds


def _time_image(model, inputs, target_hw, steps, device, cache) -> float:
    text, pooled, conds = inputs
    _sync(device)
    start = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(0)
    out = sample_latents(model, text, pooled, conds, target_hw, steps, 3.5, 1.0, gen, cache)
    _sync(device)
    assert torch.isfinite(out.rgb).all() and torch.isfinite(out.point_map).all()
    return time.perf_counter() - start


def sampler_mode(model, inputs, target_hw, device, cache: bool, timed_steps: int, reps: int) -> dict:
    _time_image(model, inputs, target_hw, 2, device, cache)  # compile + warm-up
    if cache:
        times = [_time_image(model, inputs, target_hw, STEPS, device, True) for _ in range(reps)]
        text, pooled, conds = inputs
        _sync(device)
        start = time.perf_counter()
        guidance = torch.full((1,), 3.5, device=device)
        model.encode_conditions(conds.rgb, conds.point_map, conds.size, target_hw, pooled, guidance)
        _sync(device)
        encode_s = time.perf_counter() - start
        return {"s_per_image": statistics.median(times), "all_s": times, "steps": STEPS, "encode_s": encode_s}
    times = [_time_image(model, inputs, target_hw, timed_steps, device, False) for _ in range(reps)]
    per_step = statistics.median(times) / timed_steps
    return {
        "s_per_step": per_step,
        "s_per_image_x28": per_step * STEPS,
        "all_s": times,
        "timed_steps": timed_steps,
    }


def dense_flux_mode(model, inputs, target_hw, device, timed_steps: int) -> dict:
    """Plain Flux forward (no group mask, no LoRA routing) over the same tokens, per step."""
    text, pooled, conds = inputs
    flux = model.flux
    lt = target_hw[0] * target_hw[1]
    image = torch.cat([torch.randn_like(conds.rgb[:, 0, :1]).expand(1, lt, -1), conds.rgb.flatten(1, 2)], 1)
    image = torch.cat([image, conds.point_map.flatten(1, 2), image[:, :lt]], dim=1)
    layout = TokenLayout(text.shape[1], lt, conds.rgb.shape[2], conds.rgb.shape[1], True)
    txt_ids, img_ids = token_ids(layout, target_hw, conds.size, True)
    t = torch.full((1,), 0.5, device=device, dtype=image.dtype)

    def step():
        with torch.no_grad():
            flux(
                hidden_states=image,
                encoder_hidden_states=text,
                pooled_projections=pooled,
                timestep=t,
                img_ids=img_ids.to(device),
                txt_ids=txt_ids.to(device),
                guidance=torch.full_like(t, 3.5),
            )

    for _ in range(2):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(timed_steps):
        step()
    _sync(device)
    per_step = (time.perf_counter() - start) / timed_steps
    return {"s_per_step": per_step, "s_per_image_x28": per_step * STEPS, "timed_steps": timed_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU validation with a tiny config")
    parser.add_argument("--timed-steps", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument(
        "--modes", default="independent_cached,independent_uncached,paper_group_mask,dense_flux"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    dims = TINY_FLUX_CONFIG if args.tiny else FULL_FLUX_CONFIG
    text, target_hw, cond_hw = (8, (4, 4), (4, 4)) if args.tiny else (512, (32, 32), (32, 32))
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "tokens": {"text": text, "target": target_hw, "cond": cond_hw, "views": 8},
        "modes": {},
    }

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))

    from diffusers import FluxTransformer2DModel

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):  # random init straight on the device, in bf16
        flux = FluxTransformer2DModel(**dims)
    torch.set_default_dtype(default_dtype)
    flux.requires_grad_(False)
    model = RefAny3DTransformer(flux, attention="flex", compile_blocks=True).eval()
    with torch.no_grad():  # non-zero adapters and switcher: every route does its real work
        for p in model.trainable_parameters():
            p.normal_(0, 1e-3)
    results["model_built_s"] = time.perf_counter() - started
    inputs = _inputs(dims, text, target_hw, cond_hw, 8, device, dtype)
    for name in [m for m in args.modes.split(",") if m]:
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            if name == "dense_flux":
                result = dense_flux_mode(model, inputs, target_hw, device, args.timed_steps)
            else:
                model.independent_conditions = name != "paper_group_mask"
                cache = name == "independent_cached"
                result = sampler_mode(model, inputs, target_hw, device, cache, args.timed_steps, args.reps)
        except Exception as err:  # keep the other modes' numbers
            result = {"failed": f"{type(err).__name__}: {str(err)[:400]}"}
        result["wall_s_incl_warmup"] = time.perf_counter() - t0
        if device.type == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.empty_cache()
        results["modes"][name] = result
        print(name, json.dumps(result, default=str), flush=True)
        save()
    results["total_wall_s"] = time.perf_counter() - started
    save()


if __name__ == "__main__":
    main()
