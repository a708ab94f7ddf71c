"""`hunyuan3d` mesher: hy3dgen 2.0.2's `Hunyuan3DDiTFlowMatchingPipeline` (Hunyuan3D-2 shape model).

Weights: `mesher.weights` = a directory laid out as the tencent/Hunyuan3D-2 snapshot (or a hub id
in the local HF cache), `DIR/hunyuan3d-dit-v2-0[-turbo]/config.yaml + model.fp16.safetensors`;
hy3dgen builds every network from the config (DINOv2 from its inline config) and loads the one
safetensors file, so nothing is downloaded. The DiT runs batched over the chunk's objects (one
latent per object, each from its own seeded CPU generator, so batching never changes a result);
volume decoding and surface extraction run one object at a time (FlashVDM is batch 1 only).
Surface extraction: hy3dgen's `mc` / `dmc`, or ours (`torch_mc`, on the grid's device), set on
this VAE instance only; `compile` wraps this instance's DiT and decoder block, nothing global.
"""

from __future__ import annotations

import importlib.util
import threading
import time
import zlib
from collections.abc import Sequence

import numpy as np
import trimesh
from PIL import Image

from refany3d.config import MesherSettings, SettingsError
from refany3d.models._device_lock import holds_device_lock
from refany3d.models._torch import torch_device_dtype
from refany3d.models.mesher.base import MesherTimeout
from refany3d.models.mesher.dense_volume import DenseVolumeDecoder
from refany3d.models.mesher.torch_mc import marching_cubes
from refany3d.models.sdpa import attention_kernels
from refany3d.models.weights import HUNYUAN3D_SUBFOLDERS, resolve_hunyuan3d
from refany3d.records import Sample

DEFAULT_STEPS = {"standard": 50, "turbo": 5}
BOX = 1.01  # half side of the decoded volume (hy3dgen's box_v)
MC_LEVEL = 0.0  # iso-level of the occupancy logits
# the `CrossAttentionDecoder` submodules `compile` wraps, in the order its forward runs them
COMPILED_DECODER_PARTS = ("fourier_embedder", "query_proj", "cross_attn_decoder", "ln_post", "output_proj")


def surface_algorithm(mc_algo: str, device_type: str) -> str:
    """`mc` (skimage, CPU), `dmc` (diso, CUDA) or `torch` (ours, any device) for `mesher.mc_algo`;
    `auto` picks dmc where it can run, else torch on CUDA, else mc."""
    has_diso = importlib.util.find_spec("diso") is not None
    if mc_algo == "auto":
        if device_type == "cuda":
            return "dmc" if has_diso else "torch"
        return "mc"
    if mc_algo == "dmc" and (device_type != "cuda" or not has_diso):
        # hy3dgen's dmc returns no surface at all without diso: say so before any work
        raise SettingsError(
            "mesher.mc_algo='dmc' needs the diso package and a CUDA runtime.device; use mc or auto"
        )
    return mc_algo


class TorchSurfaceExtractor:
    """hy3dgen's surface-extractor interface around `torch_mc.marching_cubes`, on the grid's device.

    Same output as hy3dgen's `MCSurfaceExtractor` (vertices mapped into the box the same way,
    skimage's winding, which `export_to_trimesh` reverses); no surface gives None."""

    def __call__(self, grid_logits, *, mc_level, bounds, octree_resolution, **kwargs):
        from hy3dgen.shapegen.models.autoencoders.surface_extractors import Latent2MeshOutput

        box = [-bounds] * 3 + [bounds] * 3 if isinstance(bounds, float) else list(bounds)
        lo, hi = np.array(box[:3]), np.array(box[3:])
        outputs = []
        for grid in grid_logits:
            verts, faces = marching_cubes(grid, mc_level)
            if len(faces) == 0:
                outputs.append(None)
                continue
            # hy3dgen's `mc` divides by the point count (octree + 1), not the cell count: keep it
            verts = verts.cpu().numpy() / (octree_resolution + 1) * (hi - lo) + lo
            outputs.append(Latent2MeshOutput(verts.astype(np.float32), faces.cpu().numpy()))
        return outputs


def _head_dim(model) -> int:
    """Head dim of the first attention in `model` (hy3dgen's DiT blocks: hidden_size / num_heads;
    its VAE's attention: width / heads)."""
    for module in model.modules():
        heads = getattr(module, "num_heads", None) or getattr(module, "heads", None)
        width = getattr(module, "hidden_size", None) or getattr(module, "width", None)
        if isinstance(heads, int) and isinstance(width, int) and heads > 0:
            return width // heads
    return 0


def sample_seed(seed: int, sample: Sample) -> int:
    """The initial-noise seed of one object, fixed by (build seed, sample id)."""
    return zlib.crc32(f"{seed}:{sample.sample_id}".encode())


class Hunyuan3DMesher:
    name = "hunyuan3d"

    def __init__(
        self,
        weights: str,
        device: str = "cpu",
        dtype: str = "float32",
        *,
        dit: str = "standard",
        flashvdm: bool = False,
        mc_algo: str = "auto",
        compile: bool = False,
    ) -> None:
        from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline

        root = resolve_hunyuan3d(weights, dit)
        self.device, self.dtype = torch_device_dtype(device, dtype)
        algorithm = surface_algorithm(mc_algo, self.device.type)
        self.pipe = Hunyuan3DDiTFlowMatchingPipeline.from_pretrained(
            str(root),  # absolute: hy3dgen joins relative paths under ~/.cache/hy3dgen
            device=str(self.device),
            dtype=self.dtype,
            subfolder=HUNYUAN3D_SUBFOLDERS[dit],
            use_safetensors=True,
            variant="fp16",
        )
        self.dit = dit
        # One object batch at a time on any device: the pipeline keeps state between the calls of
        # a generation (its scheduler's step index, FlashVDM's chunk plan on its attention
        # processor), and two mesh tasks of a thread-runner build share this instance. On CUDA
        # `DEVICE_LOCK` serialises them too; on the CPU two at once raced to an IndexError.
        self._generating = threading.Lock()
        self.configure_decoder(flashvdm, algorithm)
        if compile and self.device.type == "cuda":
            self.compile()

    def configure_decoder(self, flashvdm: bool, algorithm: str) -> None:
        """Dense (`DenseVolumeDecoder`) or FlashVDM volume decoding, `mc` / `dmc` / `torch` surface
        extraction, on the VAE instance this backend owns (hy3dgen keeps that choice on the VAE)."""
        from hy3dgen.shapegen.models.autoencoders import SurfaceExtractors

        vae = self.pipe.vae
        hy3dgen_algo = "mc" if algorithm == "torch" else algorithm  # hy3dgen knows mc and dmc
        if flashvdm:
            vae.enable_flashvdm_decoder(
                enabled=True, adaptive_kv_selection=True, topk_mode="mean", mc_algo=hy3dgen_algo
            )
        else:
            vae.enable_flashvdm_decoder(enabled=False)
            vae.volume_decoder = DenseVolumeDecoder()  # hy3dgen's, with the grid made on the GPU
            vae.surface_extractor = SurfaceExtractors[hy3dgen_algo]()
        if algorithm == "torch":
            vae.surface_extractor = TorchSurfaceExtractor()

    def compile(self, backend: str = "inductor") -> None:
        """torch.compile the DiT and, for dense decoding, the parts of the geometry decoder, on
        this instance: the query embedding (Fourier features, projection), the cross-attention
        block (fused norms, GELU and residuals around the matmuls and SDPA) and the output head.

        The first denoise and decode then compile (about a minute on an H200); each new DiT batch
        size compiles once more (every dense chunk has one size). The parts, not the whole
        `CrossAttentionDecoder`: its forward bumps an int counter (`self.count`), which dynamo
        treats as static and recompiles on every chunk.
        FlashVDM's ragged chunks and stateful processor stay eager. For CUDA dataset runs."""
        import torch
        from hy3dgen.shapegen.models.autoencoders.attention_blocks import CrossAttentionDecoder

        self.pipe.model = torch.compile(self.pipe.model, backend=backend, dynamic=False)
        vae = self.pipe.vae
        if not isinstance(vae.volume_decoder, DenseVolumeDecoder):
            return
        # also found inside wrappers of the decoder
        decoders = [m for m in vae.geo_decoder.modules() if isinstance(m, CrossAttentionDecoder)]
        for decoder in decoders:
            for name in COMPILED_DECODER_PARTS:
                part = getattr(decoder, name, None)
                if isinstance(part, torch.nn.Module):
                    setattr(decoder, name, torch.compile(part, backend=backend, dynamic=False))

    @holds_device_lock
    def generate(
        self,
        images: Sequence[Image.Image],
        samples: Sequence[Sample],
        options: MesherSettings,
        seed: int,
        deadline: float,
    ) -> list[trimesh.Trimesh | None]:
        with self._generating:
            latents = self.denoise(images, samples, options, seed, deadline)
            out = []
            for latent in latents:
                if time.monotonic() > deadline:
                    raise MesherTimeout(
                        f"hunyuan3d passed its deadline after {len(out)} of {len(samples)} decodes", done=out
                    )
                out.append(self.decode(latent[None], options))
            return out

    def dit_kernels(self):
        """The SDPA kernel context of the DiT's joint attention (latents with image tokens)."""
        latents = self.pipe.vae.latent_shape[0]
        return attention_kernels(_head_dim(self.pipe.model), self.dtype, latents, latents, self.device)

    def decoder_kernels(self, options: MesherSettings):
        """The SDPA kernel context of the geometry decoder's cross-attention: a chunk of volume
        queries on the latents. Dense chunks all have one size; FlashVDM's are smaller and ragged
        (one per grid cell, a new length almost every call), so no per-shape-planned kernel there."""
        vae = self.pipe.vae
        queries = options.num_chunks // 10 if options.flashvdm else options.num_chunks
        return attention_kernels(
            _head_dim(vae.geo_decoder),
            self.dtype,
            queries,
            vae.latent_shape[0],
            self.device,
            shapes_vary=options.flashvdm,
        )

    def denoise(self, images, samples, options: MesherSettings, seed: int, deadline: float):
        """(B, num_latents, embed_dim) latents of the DiT for B RGBA images, in one batch."""
        import torch

        def check_deadline(step: int, t, outputs) -> None:
            if time.monotonic() > deadline:
                raise MesherTimeout(f"hunyuan3d DiT passed its deadline at step {step}")

        generators = [torch.Generator("cpu").manual_seed(sample_seed(seed, s)) for s in samples]
        with self.dit_kernels():  # compiled, it keeps the kernel it was traced with
            return self.pipe(
                image=[im.convert("RGBA") for im in images],
                num_inference_steps=options.steps or DEFAULT_STEPS[self.dit],
                guidance_scale=options.guidance,
                generator=generators,
                output_type="latent",
                enable_pbar=False,
                callback=check_deadline,
                callback_steps=1,
            )

    def decode(self, latent, options: MesherSettings) -> trimesh.Trimesh | None:
        """Mesh of one (1, num_latents, embed_dim) latent in hy3dgen's frame, or None (no surface)."""
        import torch
        from hy3dgen.shapegen.pipelines import export_to_trimesh

        vae = self.pipe.vae
        kwargs = dict(
            bounds=BOX,
            mc_level=MC_LEVEL,
            num_chunks=options.num_chunks,
            octree_resolution=options.octree_resolution,
            enable_pbar=False,
        )
        with torch.inference_mode():
            latent = vae(latent / vae.scale_factor)
            with self.decoder_kernels(options):
                grid = vae.volume_decoder(latent, vae.geo_decoder, **kwargs)
            surfaces = vae.surface_extractor(grid, **kwargs)
        mesh = export_to_trimesh(surfaces)[0]  # hy3dgen's winding fix (faces reversed)
        if mesh is None or len(mesh.faces) == 0:
            return None
        return mesh
