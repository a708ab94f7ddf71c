"""Perception stages on a GPU with full-size random-weight models: ms per image, batch 1 and 8.

Builds GroundingDINO Swin-T (the IDEA-Research/grounding-dino-tiny architecture), SAM ViT-H
(segment-anything) and Depth Pro (the apple/DepthPro-hf architecture: DINOv2-L encoders, 1536 px,
FOV head) from configs written here, with random weights (same compute as the released ones),
saves them in the formats our loaders read, loads them through `refany3d.models` exactly as a build
does, and times our `detect`, `segment` and `depth` stages end to end (PNG decode, processors,
model, post-processing, artifact writes) on 512 px views. Nothing is downloaded.

    python bench/perception_bench.py --out bench/results/perception.json [--device cuda --dtype float16]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from refany3d.config import BuildSettings, override
from refany3d.models.depth import load_depth
from refany3d.models.detector import load_detector
from refany3d.models.segmenter import load_segmenter
from refany3d.records import DEPTH, IMAGE, MASK, Sample
from refany3d.stages._views import read_mask
from refany3d.stages.context import StageContext
from refany3d.stages.depth import depth
from refany3d.stages.detect import detect
from refany3d.stages.segment import segment
from refany3d.storage.store import ArtifactStore

ITEMS = ["red mug", "wooden chair", "toy car", "blue vase", "teapot", "desk lamp", "sneaker", "backpack"]


def build_grounding_dino(path: Path) -> None:
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    swin_t = SwinConfig(
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        image_size=224,
        out_features=["stage2", "stage3", "stage4"],
    )
    bert_base = BertConfig()  # bert-base-uncased: 12 layers, 768 wide, 30522 tokens
    cfg = GroundingDinoConfig(
        backbone_config=swin_t,
        text_config=bert_base,
        num_queries=900,
        encoder_layers=6,
        decoder_layers=6,
        d_model=256,
        num_feature_levels=4,
        encoder_n_points=4,
        decoder_n_points=4,
        max_text_len=256,
        two_stage=True,
    )
    GroundingDinoForObjectDetection(cfg).save_pretrained(path)
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?"]
    words += sorted({w for item in ITEMS for w in item.split()})
    words += [f"tok{i}" for i in range(bert_base.vocab_size - len(words))]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    GroundingDinoProcessor(GroundingDinoImageProcessor(), tokenizer).save_pretrained(path)


def build_sam_vit_h(path: Path) -> None:
    from refany3d.models.segmenter.sam import build_sam

    sam = build_sam(
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=[7, 15, 23, 31],
    )
    torch.save(sam.state_dict(), path)


def build_depth_pro(path: Path) -> None:
    from transformers import DepthProConfig, DepthProForDepthEstimation, DepthProImageProcessor

    dinov2_l = {
        "model_type": "dinov2",
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "patch_size": 16,
        "image_size": 384,
        "layerscale_value": 1e-5,
    }
    cfg = DepthProConfig(
        fusion_hidden_size=256,
        patch_size=384,
        intermediate_hook_ids=[11, 5],
        intermediate_feature_dims=[256, 256],
        scaled_images_ratios=[0.25, 0.5, 1.0],
        scaled_images_overlap_ratios=[0.0, 0.5, 0.25],
        scaled_images_feature_dims=[1024, 1024, 512],
        merge_padding_value=3,
        use_batch_norm_in_fusion_residual=False,
        use_bias_in_fusion_residual=True,
        use_fov_model=True,
        num_fov_head_layers=2,
        image_model_config=dinov2_l,
        patch_model_config=dict(dinov2_l),
        fov_model_config=dict(dinov2_l),
    )
    model = DepthProForDepthEstimation(cfg)
    with torch.no_grad():  # a plausible field of view from random weights
        head = model.fov_model.head.layers[-1]
        head.weight.mul_(0.001)
        head.bias.fill_(50.0)
    model.save_pretrained(path)
    DepthProImageProcessor().save_pretrained(path)  # 1536 × 1536 input


def views(store: ArtifactStore, n: int, size: int = 512) -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 90, (size, size, 3), dtype=np.uint8))
        x0, y0 = rng.integers(20, size // 3, 2)
        x1, y1 = rng.integers(size // 2, size - 20, 2)
        ImageDraw.Draw(image).ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(120, 255, 3)))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        uri = store.put_content("image", buf.getvalue(), ".png")
        sid = f"bench-{i:03d}-left"
        out.append(
            Sample(
                sid,
                sid[:-5],
                "subjects200k",
                f"bench#{i}",
                side="left",
                item=ITEMS[i % len(ITEMS)],
                artifacts={IMAGE: uri},
            )
        )
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _ModelClock:
    """Seconds spent inside a backend's network forward (CUDA-synchronised forward hooks)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.total = 0.0
        self._start = 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *_):
        _sync()
        self._start = time.perf_counter()

    def _post(self, *_):
        _sync()
        self.total += time.perf_counter() - self._start


def time_stages(samples, settings, ctx, repeats: int, profile_dir: Path | None = None) -> dict[str, float]:
    """Median ms per image of each stage over `repeats` runs (after one warm-up run), the part of
    it spent in the network forward (`<stage>_model`) and the warm-up run's seconds (`<stage>_warmup_s`:
    with compiled layers, mostly compile time). With `profile_dir`, the last run of each stage is
    also profiled with cProfile (top functions by own time, in `<stage>.txt`)."""
    clocks = {
        "detect": _ModelClock(load_detector(settings).model),
        "segment": _ModelClock(load_segmenter(settings).model),
        "depth": _ModelClock(load_depth(settings).model),
    }
    per_stage: dict[str, list[float]] = {k: [] for k in ("detect", "segment", "depth")}
    per_model: dict[str, list[float]] = {k: [] for k in per_stage}
    warmup: dict[str, float] = {}
    for rep in range(repeats + 1):
        current = samples
        for name, fn in (("detect", detect), ("segment", segment), ("depth", depth)):
            clocks[name].total = 0.0
            prof = cProfile.Profile() if profile_dir is not None and rep == repeats else None
            _sync()
            start = time.perf_counter()
            if prof is not None:
                prof.enable()
            result = fn(current, settings, ctx)
            _sync()
            elapsed = time.perf_counter() - start
            if prof is not None:
                prof.disable()
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
                (profile_dir / f"{name}.txt").write_text(text.getvalue())
            if rep == 0:
                warmup[f"{name}_warmup_s"] = round(elapsed, 1)
            assert len(result.kept) == len(current), (name, result.dropped[:2])
            current = result.kept
            if rep > 0:
                per_stage[name].append(1000 * elapsed / len(samples))
                per_model[name].append(1000 * clocks[name].total / len(samples))
    out = {k: round(statistics.median(v), 2) for k, v in per_stage.items()}
    out["total"] = round(sum(out.values()), 2)
    out.update({f"{k}_model": round(statistics.median(v), 2) for k, v in per_model.items()})
    out.update(warmup)
    return out


def torch_profile(samples, settings, ctx, out_dir: Path, prefix: str = "") -> None:
    """One run of each stage under `torch.profiler` (CPU + CUDA): op tables by own GPU time and by
    CPU time in `<out_dir>/<prefix><stage>_torch.txt`, to see where a stage's time goes."""
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    current = samples
    for name, fn in (("detect", detect), ("segment", segment), ("depth", depth)):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            result = fn(current, settings, ctx)
            _sync()
        table = prof.key_averages()
        text = []
        for key in ("self_device_time_total", "cpu_time_total"):
            try:
                text.append(table.table(sort_by=key, row_limit=30, max_name_column_width=70))
            except Exception as err:  # noqa: BLE001 - sort keys differ between torch versions
                text.append(f"{key}: {err!r}")
        (out_dir / f"{prefix}{name}_torch.txt").write_text("\n\n".join(text))
        current = result.kept


def _stage_outputs(samples, settings, ctx) -> list[tuple]:
    """(box, mask, depth, focal) of each view after detect → segment → depth under `settings`."""
    current = samples
    for fn in (detect, segment, depth):
        current = fn(current, settings, ctx).kept
    out = []
    for s in current:
        mask = np.asarray(read_mask(ctx.store, s.artifacts[MASK])) > 0
        d = np.load(io.BytesIO(ctx.store.get(s.artifacts[DEPTH])))["depth"].astype(np.float32)
        out.append((np.asarray(s.box, np.float64), mask, d, s.focal_px))
    return out


def compare_outputs(samples, settings, reference, ctx) -> dict[str, float]:
    """How far the stages' outputs under `settings` are from those under `reference` (same views):
    largest box corner difference (px), smallest mask IoU, largest relative depth and focal differences."""
    a, b = _stage_outputs(samples, settings, ctx), _stage_outputs(samples, reference, ctx)
    assert len(a) == len(b) == len(samples)
    iou = [(m1 & m2).sum() / max((m1 | m2).sum(), 1) for (_, m1, _, _), (_, m2, _, _) in zip(a, b)]
    return {
        "views": len(a),
        "box_max_abs_px": float(max(np.abs(x[0] - y[0]).max() for x, y in zip(a, b))),
        "mask_min_iou": round(float(min(iou)), 6),
        "depth_max_rel": float(max((np.abs(x[2] - y[2]) / y[2]).max() for x, y in zip(a, b))),
        "focal_max_rel": float(max(abs(x[3] - y[3]) / y[3] for x, y in zip(a, b))),
    }


def _bare_ms(fn, repeats: int = 5) -> float:
    fn()
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return 1000 * (time.perf_counter() - start) / repeats


def variants(settings, batch: int = 8) -> dict[str, float]:
    """Bare-network ms per image for design choices: SAM encoder attention (segment-anything's eager
    softmax, SDPA with the rel-pos mask, SDPA with rel-pos folded into Q/K = our default) and
    Depth Pro memory format (NCHW vs channels_last)."""
    from segment_anything.modeling.image_encoder import Attention

    from refany3d.models.segmenter.sam import _augmented_attention_class, _sdpa_attention_class

    out = {}
    sam = load_segmenter(settings)
    x = torch.randn(batch, 3, 1024, 1024, device=sam.device)
    blocks = sam.model.image_encoder.blocks
    default = [b.attn.__class__ for b in blocks]
    choices = {
        "sam_encoder_eager": Attention,
        "sam_encoder_sdpa": _sdpa_attention_class(),
        "sam_encoder_flash_augmented": _augmented_attention_class(),
    }
    with torch.inference_mode(), torch.autocast("cuda", dtype=sam.dtype):
        for name, cls in choices.items():
            for b in blocks:
                b.attn.__class__ = cls
            out[name] = _bare_ms(lambda: sam.model.image_encoder(x)) / batch
    for b, cls in zip(blocks, default, strict=True):
        b.attn.__class__ = cls
    est = load_depth(settings)
    pix = torch.randn(batch, 3, 1536, 1536, device=est.device, dtype=est.dtype)
    with torch.inference_mode():
        out["depth_pro_nchw"] = _bare_ms(lambda: est.model(pixel_values=pix), 3) / batch
        est.model.to(memory_format=torch.channels_last)
        out["depth_pro_channels_last"] = _bare_ms(lambda: est.model(pixel_values=pix), 3) / batch
        est.model.to(memory_format=torch.contiguous_format)
    return {k: round(v, 2) for k, v in out.items()}


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/perception.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--modes",
        default="defaults,no_graphs",
        help="defaults = as configured; no_graphs = defaults without CUDA graphs; "
        "eager = no compile, no graphs; compiled = compiled layers, no graphs",
    )
    parser.add_argument(
        "--compare", action="store_true", help="compare the outputs of defaults and no_graphs (batch 1 and 8)"
    )
    parser.add_argument("--profile-dir", default="", help="cProfile the batch-8 stages (not eager) here")
    parser.add_argument("--variants", action="store_true", help="also time the bare-network design choices")
    parser.add_argument(
        "--torch-profile", default="", help="torch.profiler tables of each stage at batch 8 here"
    )
    parser.add_argument("--batches", default="8,1", help="model batch sizes to time")
    args = parser.parse_args()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # batch 8 / batch 1 / per-prompt text lengths: more input shapes per layer than dynamo's default 8
    torch._dynamo.config.recompile_limit = 64
    import transformers

    out = Path(args.out)
    report = {
        "bench": "perception stages (detect hf-grounding-dino Swin-T, segment sam vit_h, depth depth-pro DINOv2-L 1536)",
        "unit": "ms per image through the stages (PNG read, processors, model, post-processing, artifact writes), "
        "median of repeats; <stage>_model = the network forward alone; <stage>_warmup_s = the first "
        "(untimed) run in seconds, compile included",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "transformers": transformers.__version__,
        },
        "device": args.device,
        "dtype": args.dtype,
        "images": args.images,
        "view_px": 512,
        "repeats": args.repeats,
        "targets_ms": {"batch_8_total": 100, "batch_1_total": 150},
    }
    work = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    build_grounding_dino(work / "gdino")
    build_sam_vit_h(work / "sam_vit_h.pth")
    build_depth_pro(work / "depth_pro")
    report["model_build_s"] = round(time.perf_counter() - t0, 1)
    ctx = StageContext(store=ArtifactStore(str(work / "artifacts")), seed=0)
    samples = views(ctx.store, args.images)
    base = override(
        BuildSettings(),
        **{
            "runtime.device": args.device,
            "runtime.dtype": args.dtype,
            "detector.backend": "hf-grounding-dino",
            "detector.weights": str(work / "gdino"),
            "detector.box_threshold": 0.0,
            "detector.text_threshold": 0.0,  # random weights: keep every image
            "segmenter.backend": "sam",
            "segmenter.weights": str(work / "sam_vit_h.pth"),
            "segmenter.model_type": "vit_h",
            "segmenter.max_area_ratio": 1.0,
            "segmenter.min_area_ratio": 0.0,
            "segmenter.max_components": 1000000,
            "depth.backend": "depth-pro",
            "depth.weights": str(work / "depth_pro"),
        },
    )
    sections = ("detector", "segmenter", "depth")
    modes = {
        "defaults": {},
        "no_graphs": {f"{s}.cuda_graphs": False for s in sections},
        "eager": {f"{s}.{o}": False for s in sections for o in ("compile", "cuda_graphs")},
        "compiled": {
            **{f"{s}.compile": True for s in sections},
            **{f"{s}.cuda_graphs": False for s in sections},
        },
    }
    for mode in args.modes.split(","):
        key = "results" if mode == "eager" else f"results_{mode}"
        report[key] = {}
        for batch in [int(b) for b in args.batches.split(",")]:
            settings = override(base, **{f"{s}.batch_size": batch for s in sections}, **modes[mode])
            profile = Path(args.profile_dir) if args.profile_dir and mode != "eager" and batch == 8 else None
            if profile is not None:
                profile.mkdir(parents=True, exist_ok=True)
            try:
                report[key][f"batch_{batch}"] = time_stages(samples, settings, ctx, args.repeats, profile)
            except Exception as err:  # noqa: BLE001 - the other numbers must still be written
                report[key][f"batch_{batch}"] = {"error": repr(err)[:500]}
            print(f"{mode} batch {batch}: {report[key][f'batch_{batch}']}", flush=True)
            _write(out, report)
            if args.torch_profile and batch == 8:
                torch_profile(samples[:16], settings, ctx, Path(args.torch_profile), f"{mode}_")
        if torch.cuda.is_available():  # weights, activations and graph pools of this process so far
            report[key]["gpu_max_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            _write(out, report)
    if args.compare:
        report["graphs_vs_no_graphs"] = {}
        for batch in (1, 8):
            sized = {f"{s}.batch_size": batch for s in sections}
            report["graphs_vs_no_graphs"][f"batch_{batch}"] = compare_outputs(
                samples[:8], override(base, **sized), override(base, **sized, **modes["no_graphs"]), ctx
            )
        print("graphs vs no graphs:", report["graphs_vs_no_graphs"], flush=True)
        _write(out, report)
    if args.variants:
        try:
            report["variants_bare_batch_8"] = variants(
                override(base, **{f"{s}.batch_size": 8 for s in sections})
            )
        except Exception as err:  # noqa: BLE001 - the stage numbers above must still be written
            report["variants_bare_batch_8"] = {"error": repr(err)[:300]}
    _write(out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
