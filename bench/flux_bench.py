"""Benchmark of the RefAny3D network: one-layer group attention and full training steps.

On an H100 with full-size FLUX.1-dev dimensions and random weights (bf16):
- attention micro-benchmark: one layer's attention forward + backward at 18,944 tokens, 24 x 128
  heads: dense SDPA (no mask), one SDPA call per query group (the reference implementation's way),
  compiled flex_attention with a block mask, and the "grouped" batched SDPA;
- seconds per training step (forward + backward + AdamW on LoRA/switcher parameters, gradient
  checkpointing) for several settings, next to a plain dense `FluxTransformer2DModel` forward +
  backward of the same token count (peft LoRA r16 on every token), with peak memory.

Usage: python bench/flux_bench.py --out results.json [--tiny] [--budget-s 480]
`--tiny` runs everything on the CPU with a tiny config to validate the script.
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

from refany3d.models.flux import FlowBatch, RefAny3DTransformer, flow_matching_loss
from refany3d.models.flux.attention import GroupAttention, group_mask
from refany3d.models.flux.positions import TokenLayout, token_ids
from refany3d.models.flux.transformer import TINY_FLUX_CONFIG

FULL_FLUX_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, warmup: int, reps: int) -> list[float]:
    """Wall seconds of each of `reps` calls after `warmup` calls (synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------- attention micro-benchmark


def _per_group_attention(layout: TokenLayout, text_agnostic: bool):
    """The reference implementation's way: one SDPA call per query group over its gathered keys."""
    kind, view = layout.kind_and_view()
    groups = torch.stack([kind, view], dim=1)
    bounds = [0] + [i for i in range(1, len(groups)) if not torch.equal(groups[i], groups[i - 1])]
    bounds.append(len(groups))
    mask = group_mask(layout, text_agnostic)
    plan = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        allowed = mask[start]
        spans = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if allowed[a]]
        plan.append(((start, stop), spans))

    def attend(q, k, v):
        outs = []
        for (start, stop), spans in plan:
            keys = torch.cat([k[:, a:b] for a, b in spans], dim=1)
            values = torch.cat([v[:, a:b] for a, b in spans], dim=1)
            out = torch.nn.functional.scaled_dot_product_attention(
                q[:, start:stop].transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
            )
            outs.append(out.transpose(1, 2))
        return torch.cat(outs, dim=1)

    return attend


def _flex_variant(layout: TokenLayout, device, options: dict):
    """Compiled flex_attention with other kernel options / compile mode (block mask as the model's)."""
    from torch.nn.attention.flex_attention import flex_attention

    mode = options.pop("mode", None)
    compiled = torch.compile(flex_attention, dynamic=False, mode=mode)
    block_mask = GroupAttention(layout, "flex", True, device)._block_mask

    def attend(q, k, v):
        out = compiled(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            block_mask=block_mask,
            kernel_options=options,
        )
        return out.transpose(1, 2)

    return attend


def attention_micro(
    layout: TokenLayout, heads: int, head_dim: int, device, dtype, reps: int, extra_flex: dict | None = None
) -> dict:
    extra_flex = extra_flex or {}
    g = torch.Generator(device=device).manual_seed(0)
    shape = (1, layout.joint_len, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, generator=g, device=device, dtype=dtype)

    def dense(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return out.transpose(1, 2)

    variants = {
        "dense_sdpa_no_mask": dense,
        "per_group_sdpa": _per_group_attention(layout, True),
        "grouped": GroupAttention(layout, "grouped", True, device),
    }
    if device.type == "cuda":
        variants["flex_compiled"] = GroupAttention(layout, "flex", True, device)
        for label, options in extra_flex.items():
            variants[label] = _flex_variant(layout, device, options)
    reference = variants["per_group_sdpa"](q, k, v).float()
    results = {"tokens": layout.joint_len, "heads": heads, "head_dim": head_dim, "dtype": str(dtype)}
    for name, fn in variants.items():
        if name in results:
            continue

        def step(fn=fn):
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(grad)

        try:
            times = _time(step, device, warmup=3, reps=reps)
            with torch.no_grad():
                out = fn(q, k, v).float()
        except Exception as err:  # an optional kernel option may not compile here
            results[name] = f"failed: {type(err).__name__}: {str(err)[:300]}"
            print(f"attention {name:20s} {results[name]}", flush=True)
            continue
        err = ((out - reference).norm() / reference.norm()).item() if name != "dense_sdpa_no_mask" else None
        results[name] = {"ms_fwd_bwd": 1000 * statistics.median(times), "rel_err_vs_per_group": err}
        print(f"attention {name:20s} {1000 * statistics.median(times):8.2f} ms  err {err}", flush=True)
    return results


# --------------------------------------------------------------------------- training steps


def _batch(text: int, target_hw, cond_hw, views: int, dims: dict, device, dtype, seed: int = 0) -> FlowBatch:
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    lt, lc = target_hw[0] * target_hw[1], cond_hw[0] * cond_hw[1]
    c = dims["in_channels"]
    return FlowBatch(
        target_rgb=randn(1, lt, c),
        text=randn(1, text, dims["joint_attention_dim"]),
        pooled=randn(1, dims["pooled_projection_dim"]),
        target_size=target_hw,
        target_point_map=randn(1, lt, c),
        cond_rgb=randn(1, views, lc, c),
        cond_point_map=randn(1, views, lc, c),
        cond_size=cond_hw,
    )


def _measure(step, device, warmup: int, reps: int) -> dict:
    times = _time(step, device, warmup=warmup, reps=0) or []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = _time(step, device, warmup=0, reps=reps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"s_per_step": statistics.median(times), "all_s": times, "peak_gib": peak}


def train_steps(model: RefAny3DTransformer, batch: FlowBatch, device, warmup: int, reps: int) -> dict:
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    losses = []

    def step():
        loss = flow_matching_loss(model, batch, gen)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    result = _measure(step, device, warmup, reps)
    result["last_loss"] = float(losses[-1])
    return result


def dense_flux_steps(model: RefAny3DTransformer, batch: FlowBatch, device, warmup: int, reps: int) -> dict:
    """Plain `FluxTransformer2DModel` forward + backward over the same tokens, one peft LoRA on all."""
    from peft.tuners.lora import LoraLayer

    flux = model.flux
    for module in flux.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter("reference")
    flux.enable_gradient_checkpointing()
    image = torch.cat(
        [
            batch.target_rgb,
            batch.cond_rgb.flatten(1, 2),
            batch.cond_point_map.flatten(1, 2),
            batch.target_point_map,
        ],
        dim=1,
    )
    layout = TokenLayout(batch.text.shape[1], batch.target_rgb.shape[1], batch.cond_rgb.shape[2], 8, True)
    txt_ids, img_ids = token_ids(layout, batch.target_size, batch.cond_size, True)
    params = [p for p in flux.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    t = torch.full((1,), 0.5, device=device, dtype=image.dtype)

    def step():
        out = flux(
            hidden_states=image,
            encoder_hidden_states=batch.text,
            pooled_projections=batch.pooled,
            timestep=t,
            img_ids=img_ids.to(device),
            txt_ids=txt_ids.to(device),
            guidance=torch.ones_like(t),
        ).sample
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        return _measure(step, device, warmup, reps)
    finally:
        flux.disable_gradient_checkpointing()
        for module in flux.modules():
            if isinstance(module, LoraLayer):
                module.set_adapter(list(model.lora_configs))


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU validation with a tiny config")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip variants once this is spent")
    parser.add_argument("--variants", default="", help="comma-separated subset of the training variants")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    dims = TINY_FLUX_CONFIG if args.tiny else FULL_FLUX_CONFIG
    text, target_hw, cond_hw, compact_hw = (
        (8, (4, 4), (4, 4), (2, 2)) if args.tiny else (512, (32, 32), (32, 32), (16, 16))
    )
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "flux_config": dims,
        "tokens": {
            "text": text,
            "target": target_hw,
            "cond": cond_hw,
            "compact_cond": compact_hw,
            "views": 8,
        },
    }

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))

    layout = TokenLayout(text, target_hw[0] * target_hw[1], cond_hw[0] * cond_hw[1], 8, True)
    heads, head_dim = dims["num_attention_heads"], dims["attention_head_dim"]
    tma = {"flex_compiled_tma": {"USE_TMA": True}}
    results["attention_one_layer"] = attention_micro(layout, heads, head_dim, device, dtype, 10, tma)
    save()

    from diffusers import FluxTransformer2DModel

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):  # random init straight on the device, in bf16
        flux = FluxTransformer2DModel(**dims)
    torch.set_default_dtype(default_dtype)
    flux.requires_grad_(False)
    model = RefAny3DTransformer(flux, attention="grouped", gradient_checkpointing=True)
    print(f"model built at {time.perf_counter() - started:.0f}s", flush=True)
    full = _batch(text, target_hw, cond_hw, 8, dims, device, dtype)
    compact = _batch(text, target_hw, compact_hw, 8, dims, device, dtype)

    variants = {  # name: (batch, attention, checkpoint_saves_attention, compile_blocks)
        "flex_compiled": (full, "flex", False, True),
        "dense_flux_baseline": None,
        "flex_compiled_compact": (compact, "flex", False, True),
        "flex": (full, "flex", False, False),
        "grouped_saveattn_compiled": (full, "grouped", True, True),
        "grouped_saveattn": (full, "grouped", True, False),
        "grouped_recompute": (full, "grouped", False, False),
        "grouped_saveattn_compact": (compact, "grouped", True, False),
    }
    chosen = [v for v in args.variants.split(",") if v] or list(variants)
    results["train_step"] = {}
    warmup, reps = (1, 2) if args.tiny else (2, 3)
    for name in chosen:
        if time.perf_counter() - started > args.budget_s:
            results["train_step"][name] = "skipped: time budget"
            continue
        t0 = time.perf_counter()
        try:
            if variants[name] is None:
                result = dense_flux_steps(model, full, device, warmup, reps)
            else:
                batch, attention, save_attention, compile_blocks = variants[name]
                model.attention = attention
                model.checkpoint_saves_attention = save_attention
                model.compile_blocks = compile_blocks
                result = train_steps(model, batch, device, warmup, reps)
        except Exception as err:  # keep the other variants' numbers
            result = f"failed: {type(err).__name__}: {str(err)[:300]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if isinstance(result, dict):
            result["wall_s_incl_warmup"] = time.perf_counter() - t0
            print(
                f"step {name:28s} {result['s_per_step']:.3f} s/step  peak {result['peak_gib']} GiB",
                flush=True,
            )
        else:
            print(f"step {name:28s} {result}", flush=True)
        results["train_step"][name] = result
        save()
    if device.type == "cuda" and time.perf_counter() - started < args.budget_s:
        autotuned = {"flex_max_autotune": {"mode": "max-autotune-no-cudagraphs"}}
        micro = attention_micro(layout, heads, head_dim, device, dtype, 10, autotuned)
        results["attention_one_layer"]["flex_max_autotune"] = micro.get("flex_max_autotune")
    results["total_wall_s"] = time.perf_counter() - started
    save()


if __name__ == "__main__":
    main()
