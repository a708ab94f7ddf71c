"""Hunyuan3D-2 shape generation on a GPU with full-size random weights: seconds per asset, split
into DiT (DINOv2 conditioning + denoising), volume decoding and surface extraction, with peak memory.

Builds the released architecture (`refany3d.testing.hunyuan3d.full_config`: DiT 1024 wide, 16 + 32
blocks; VAE 3072 latents; DINOv2-giant 518 px) with hy3dgen's own classes, random fp16 weights,
directly on the GPU, and runs it through our `Hunyuan3DMesher` (`denoise`, then the VAE's volume
decoder and surface extractor that `decode` calls). Random weights cost the same as real ones in
the DiT and dense decoding; FlashVDM refines only near the surface, so the geometry decoder's
output is replaced by a torus's occupancy on this VAE instance (`ShapeField`: the decoder still
runs on every query), which gives a realistic surface band. Paths:

- standard: standard DiT, 50 steps, CFG (guidance 5), dense decoding at octree 384
- fast: turbo (guidance-distilled) DiT, 5 steps, FlashVDM at octree 384
- *_compiled: the same after `Hunyuan3DMesher.compile` (DiT, and the dense geometry decoder);
  compile seconds are recorded separately (`compile_s`, one warm run per DiT batch size);
  standard_compiled runs at DiT batch 1 and 4 (`mesher.batch_size`'s default)

Surface extraction is `--mc-algo` (default `torch`, ours on the GPU); skimage's `mc` also runs on
the first grid of each row (`skimage_mc_same_grid`: seconds, faces, volume) for before/after.

    python bench/mesh_gpu_bench.py --out bench/results/mesh_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import trimesh
from hy3dgen.shapegen.models.autoencoders.surface_extractors import MCSurfaceExtractor
from PIL import Image

from refany3d.config import MesherSettings
from refany3d.models import sdpa
from refany3d.models.mesher.hunyuan3d import BOX, COMPILED_DECODER_PARTS, MC_LEVEL, Hunyuan3DMesher
from refany3d.records import Sample
from refany3d.testing.hunyuan3d import ShapeField, full_config, torus_sdf


def _cutout(i: int) -> Image.Image:
    rgba = np.zeros((512, 512, 4), np.uint8)
    rgba[120 + 10 * i : 400, 150:380] = (180, 90 + 20 * i, 60, 255)
    return Image.fromarray(rgba, "RGBA")


def _build(variant: str, shared: dict) -> Hunyuan3DMesher:
    """A mesher around a full-size random pipeline (VAE and DINOv2 shared between variants)."""
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    config = full_config(variant)
    with torch.device("cuda"):
        parts = {
            k: shared.get(k) or instantiate_from_config(copy.deepcopy(config[k]))
            for k in ("vae", "conditioner")
        }
        parts["model"] = instantiate_from_config(copy.deepcopy(config["model"]))
    shared.update(vae=parts["vae"], conditioner=parts["conditioner"])
    pipe = Hunyuan3DDiTFlowMatchingPipeline(
        **parts,
        scheduler=instantiate_from_config(config["scheduler"]),
        image_processor=instantiate_from_config(config["image_processor"]),
        device="cuda",
        dtype=torch.float16,
    )
    mesher = Hunyuan3DMesher.__new__(Hunyuan3DMesher)  # the loader's work without the 5 GB files
    mesher.pipe, mesher.dit = pipe, variant
    mesher.device, mesher.dtype = torch.device("cuda"), torch.float16
    return mesher


def _timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _run(mesher: Hunyuan3DMesher, opts: MesherSettings, batch: int, decode: int) -> dict:
    images = [_cutout(i) for i in range(batch)]
    samples = [Sample(f"b{i}", f"b{i}", "bench", f"x#{i}") for i in range(batch)]
    torch.cuda.reset_peak_memory_stats()
    latents, dit_s = _timed(lambda: mesher.denoise(images, samples, opts, 0, float("inf")))
    vae = mesher.pipe.vae
    kwargs = dict(bounds=BOX, mc_level=MC_LEVEL, num_chunks=opts.num_chunks,
                  octree_resolution=opts.octree_resolution, enable_pbar=False)  # fmt: skip
    volume, surface, faces, mc = [], [], [], {}
    for latent in latents[:decode]:
        with torch.inference_mode(), mesher.decoder_kernels(opts):  # as `decode` runs it
            grid, seconds = _timed(
                lambda latent=latent: vae.volume_decoder(
                    vae(latent[None] / vae.scale_factor), vae.geo_decoder, **kwargs
                )
            )
            volume.append(seconds)
            meshes, seconds = _timed(lambda grid=grid: vae.surface_extractor(grid, **kwargs))
            surface.append(seconds)
            if not mc:  # skimage on the same grid, for the before/after and equivalence
                ref, mc["s"] = _timed(lambda grid=grid: MCSurfaceExtractor()(grid, **kwargs))
                mc["faces"] = 0 if ref[0] is None else int(len(ref[0].mesh_f))
                mc["vertices"] = 0 if ref[0] is None else int(len(ref[0].mesh_v))
                mc["volume"] = _volume(ref[0])
        faces.append(0 if meshes[0] is None else int(len(meshes[0].mesh_f)))
    return {
        "batch": batch,
        "steps": opts.steps,
        "mc_algo": type(vae.surface_extractor).__name__,
        "dit_s_per_asset": dit_s / batch,
        "volume_s": float(np.mean(volume)),
        "surface_s": float(np.mean(surface)),
        "total_s_per_asset": dit_s / batch + float(np.mean(volume)) + float(np.mean(surface)),
        "faces": faces,
        "vertices": 0 if meshes[0] is None else int(len(meshes[0].mesh_v)),
        "volume": _volume(meshes[0]),
        "watertight": _watertight(meshes[0]),
        "skimage_mc_same_grid": mc,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }


def _profile_decode(mesher: Hunyuan3DMesher, opts: MesherSettings, top: int = 15) -> list[dict]:
    """The CUDA kernels of one dense volume decoding, by total time (torch.profiler)."""
    latent = torch.randn(1, *mesher.pipe.vae.latent_shape, device="cuda", dtype=torch.float16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.inference_mode():
            mesher.decode(latent, opts)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:top]
    return [{"kernel": e.key[:120], "calls": e.count, "total_s": e.device_time_total / 1e6} for e in rows]


def _volume(out) -> float:
    """Enclosed volume of an extractor output after hy3dgen's face reversal (> 0: outward)."""
    if out is None:
        return 0.0
    return float(trimesh.Trimesh(out.mesh_v, out.mesh_f[:, ::-1], process=False).volume)


def _watertight(out) -> bool:
    return out is not None and trimesh.Trimesh(out.mesh_v, out.mesh_f, process=False).is_watertight


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--octree", type=int, default=384)
    parser.add_argument("--mc-algo", default="torch", choices=["mc", "dmc", "torch"])
    parser.add_argument("--paths", default="", help="comma-separated subset of the paths; default: all")
    parser.add_argument("--profile", action="store_true", help="also list one dense decode's CUDA kernels")
    parser.add_argument(
        "--sdpa",
        default="table",
        choices=["table", "pytorch"],
        help="SDPA kernels: refany3d/models/sdpa_table.json's choice per shape, or PyTorch's order",
    )
    parser.add_argument(
        "--compare", action="store_true", help="standard DiT latents and dense grid: table vs PyTorch's order"
    )
    args = parser.parse_args()
    if args.sdpa == "pytorch":  # PyTorch's own kernel order (flash first): the before
        sdpa.TABLE = Path("/nonexistent/sdpa_table.json")
    results = {
        "sdpa": args.sdpa,
        "sdpa_table": [r["site"] + ": " + str(r["best"]) for r in sdpa.load_table()],
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "shape": "torus (major 0.6, minor 0.25) occupancy through ShapeField",
        "paths": {},
    }
    shared: dict = {}
    plans = {  # name: (variant, flashvdm, steps, compile, [(DiT batch, decodes)])
        "standard": ("standard", False, 50, False, [(1, 1)]),
        "fast": ("turbo", True, 5, False, [(1, 1)]),
        "standard_compiled": ("standard", False, 50, True, [(1, 1), (4, 1)]),
        "fast_compiled_dit": ("turbo", True, 5, True, [(1, 1)]),
    }
    chosen = [p for p in args.paths.split(",") if p] or list(plans)
    for name, (variant, flashvdm, steps, compiled, runs) in ((n, plans[n]) for n in chosen):
        mesher = _build(variant, shared)
        mesher.configure_decoder(flashvdm, args.mc_algo)
        ShapeField.install(mesher.pipe.vae, torus_sdf())
        opts = MesherSettings(backend="hunyuan3d", dit=variant, steps=steps, octree_resolution=args.octree,
                              flashvdm=flashvdm, mc_algo=args.mc_algo)  # fmt: skip
        try:
            if compiled:  # one warm run per DiT batch size: each compiles once
                mesher.compile()
                _, results.setdefault("compile_s", {})[name] = _timed(
                    lambda mesher=mesher, opts=opts, runs=runs: [
                        _run(mesher, replace(opts, steps=2), batch, 1) for batch, _ in runs
                    ]
                )
            warm = MesherSettings(
                backend="hunyuan3d", dit=variant, steps=2, octree_resolution=64, flashvdm=flashvdm
            )
            if not compiled:
                _run(mesher, warm, 1, 1)
            results["paths"][name] = [_run(mesher, opts, batch, decode) for batch, decode in runs]
            if args.profile and not flashvdm:
                results.setdefault("decoder_kernels", {})[name] = _profile_decode(mesher, opts)
        except Exception as err:  # record and go on: one failed variant must not lose the others
            results["paths"][name] = [{"error": repr(err)[:2000]}]
        print(name, json.dumps(results["paths"][name], indent=1), flush=True)
        vae = mesher.pipe.vae
        vae.geo_decoder = vae.geo_decoder.decoder  # unwrap ShapeField (and compile) for the next path
        for part in COMPILED_DECODER_PARTS:
            compiled_part = getattr(vae.geo_decoder, part)
            setattr(vae.geo_decoder, part, getattr(compiled_part, "_orig_mod", compiled_part))
        del mesher, vae
        torch.cuda.empty_cache()
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    if args.compare:
        results["compare"] = _compare_kernels(shared, args.octree)
        print("compare", json.dumps(results["compare"], indent=1), flush=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


def _compare_kernels(shared: dict, octree: int) -> dict:
    """The standard DiT's latents (same image and seed) and the dense grid of one latent under the
    table's kernels and under PyTorch's order: max |a - b| / max |b| of each."""
    mesher = _build("standard", shared)
    mesher.configure_decoder(False, "torch")
    opts = MesherSettings(backend="hunyuan3d", dit="standard", steps=50, octree_resolution=octree)
    samples = [Sample("c0", "c0", "bench", "x#0")]
    vae = mesher.pipe.vae
    kwargs = dict(bounds=BOX, mc_level=MC_LEVEL, num_chunks=opts.num_chunks,
                  octree_resolution=octree, enable_pbar=False)  # fmt: skip
    out, table = {}, sdpa.TABLE
    for name, path in (("table", table), ("pytorch", Path("/nonexistent/sdpa_table.json"))):
        sdpa.TABLE = path
        latents = mesher.denoise([_cutout(0)], samples, opts, 0, float("inf"))
        with torch.inference_mode(), mesher.decoder_kernels(opts):
            grid = vae.volume_decoder(vae(latents / vae.scale_factor), vae.geo_decoder, **kwargs)
        out[name] = (latents.float(), grid.float())
    sdpa.TABLE = table
    (la, ga), (lb, gb) = out["table"], out["pytorch"]
    return {
        "latents_rel_diff": float((la - lb).abs().max() / lb.abs().max()),
        "grid_rel_diff": float((ga - gb).abs().max() / gb.abs().max()),
        "grid_sign_agreement": float(((ga > 0) == (gb > 0)).float().mean()),
    }


if __name__ == "__main__":
    main()
