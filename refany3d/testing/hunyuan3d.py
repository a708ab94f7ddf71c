"""Random-weight hy3dgen pipelines saved in the tencent/Hunyuan3D-2 layout, and a shape wrapper.

`save_hunyuan3d(root, config, variant)` builds every network of a hy3dgen config dict with hy3dgen's
own `instantiate_from_config`, and writes `root/<subfolder>/config.yaml` + `model.fp16.safetensors`
exactly as the published snapshot does, so `Hunyuan3DMesher` loads it through its real loader.
`tiny_config()` is small enough for the CPU in seconds; `full_config()` is the released size
(bench). `ShapeField` replaces the geometry decoder's output with a real shape's occupancy
(random weights give a field with no surface, or surface everywhere) while still running it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from refany3d.models.weights import HUNYUAN3D_SUBFOLDERS


def _dino(hidden: int, layers: int, heads: int, image_size: int, swiglu: bool) -> dict:
    return {
        "model_type": "dinov2",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "mlp_ratio": 4,
        "patch_size": 14,
        "image_size": image_size,
        "layerscale_value": 1.0,
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "use_swiglu_ffn": swiglu,
        "hidden_act": "gelu",
    }


def _config(dit: dict, vae: dict, dino: dict, image_size: int, processor_size: int, variant: str) -> dict:
    turbo = variant == "turbo"
    scheduler = (
        {
            "target": "hy3dgen.shapegen.schedulers.ConsistencyFlowMatchEulerDiscreteScheduler",
            "params": {"num_train_timesteps": 1000, "pcm_timesteps": 100},
        }
        if turbo
        else {
            "target": "hy3dgen.shapegen.schedulers.FlowMatchEulerDiscreteScheduler",
            "params": {"num_train_timesteps": 1000},
        }
    )
    return {
        "model": {
            "target": "hy3dgen.shapegen.models.Hunyuan3DDiT",
            "params": {**dit, "guidance_embed": turbo},  # the turbo DiT is guidance-distilled
        },
        "vae": {"target": "hy3dgen.shapegen.models.ShapeVAE", "params": vae},
        "conditioner": {
            "target": "hy3dgen.shapegen.models.SingleImageEncoder",
            "params": {
                "main_image_encoder": {
                    "type": "DinoImageEncoder",
                    "kwargs": {"config": dino, "image_size": image_size},
                }
            },
        },
        "scheduler": scheduler,
        "image_processor": {
            "target": "hy3dgen.shapegen.preprocessors.ImageProcessorV2",
            "params": {"size": processor_size, "border_ratio": 0.15},
        },
    }


def tiny_config(variant: str = "standard") -> dict:
    """A config of the released architecture at toy size (DiT 32 wide, 16 latents, DINO 1 layer)."""
    dit = {
        "in_channels": 8,
        "context_in_dim": 32,
        "hidden_size": 32,
        "mlp_ratio": 2.0,
        "num_heads": 2,
        "depth": 1,
        "depth_single_blocks": 1,
        "axes_dim": [16],
        "theta": 10000,
        "qkv_bias": True,
    }
    vae = {
        "num_latents": 16,
        "embed_dim": 8,
        "num_freqs": 4,
        "include_pi": False,
        "heads": 2,
        "width": 32,
        "num_decoder_layers": 1,
        "qkv_bias": False,
        "qk_norm": True,
        "scale_factor": 1.0,
    }
    return _config(dit, vae, _dino(32, 1, 2, 56, False), 56, 64, variant)


def full_config(variant: str = "standard") -> dict:
    """The released Hunyuan3D-2 shape model's sizes (DESIGN §4): DiT 1024 wide, 16 double + 32 single
    blocks; VAE 3072 latents × 64, 16 layers; DINOv2-giant at 518 px."""
    dit = {
        "in_channels": 64,
        "context_in_dim": 1536,
        "hidden_size": 1024,
        "mlp_ratio": 4.0,
        "num_heads": 16,
        "depth": 16,
        "depth_single_blocks": 32,
        "axes_dim": [64],
        "theta": 10000,
        "qkv_bias": True,
    }
    vae = {
        "num_latents": 3072,
        "embed_dim": 64,
        "num_freqs": 8,
        "include_pi": False,
        "heads": 16,
        "width": 1024,
        "num_decoder_layers": 16,
        "qkv_bias": False,
        "qk_norm": True,
        "scale_factor": 0.9990943042622529,
    }
    return _config(dit, vae, _dino(1536, 40, 24, 518, True), 518, 512, variant)


def save_hunyuan3d(root: Path, config: dict, variant: str = "standard", seed: int = 0) -> Path:
    """Build `config`'s networks with random weights and save them under `root` in the snapshot's
    layout for `variant`; returns `root`."""
    import safetensors.torch
    import torch
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    torch.manual_seed(seed)
    folder = Path(root) / HUNYUAN3D_SUBFOLDERS[variant]
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for part in ("model", "vae", "conditioner"):
        module = instantiate_from_config(copy.deepcopy(config[part]))
        for key, value in module.state_dict().items():
            tensors[f"{part}.{key}"] = value.detach().to(torch.float16).contiguous()
    safetensors.torch.save_file(tensors, str(folder / "model.fp16.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return Path(root)


def _module_base():
    import torch

    return torch.nn.Module


class ShapeField(_module_base()):
    """Wraps one VAE instance's geometry decoder: the decoder still runs on every query (same
    compute), but its output becomes the occupancy logits of a shape, `scale * sdf_inside(x)`.

    `sdf_inside`: (..., 3) float torch points in hy3dgen's box -> (...) signed distance, positive
    inside, computed on the queries' device. Install with `ShapeField.install(vae, fn)`; only that
    instance changes.
    """

    def __init__(self, decoder, sdf_inside, scale: float = 50.0) -> None:
        super().__init__()
        self.decoder = decoder
        self.sdf_inside = sdf_inside
        self.scale = scale

    @classmethod
    def install(cls, vae, sdf_inside, scale: float = 50.0) -> ShapeField:
        field = cls(vae.geo_decoder, sdf_inside, scale)
        vae.geo_decoder = field
        return field

    def set_cross_attention_processor(self, processor) -> None:  # FlashVDM swaps the processor
        self.decoder.set_cross_attention_processor(processor)

    def forward(self, queries=None, latents=None, **kwargs):
        out = self.decoder(queries=queries, latents=latents, **kwargs)
        sdf = self.sdf_inside(queries.float()).reshape(out.shape)
        return out * 0 + (self.scale * sdf).to(out.dtype)


def sphere_sdf(radius: float = 0.6):
    return lambda p: radius - p.norm(dim=-1)


def torus_sdf(major: float = 0.6, minor: float = 0.25):
    def sdf(p):
        ring = (p[..., 0] ** 2 + p[..., 2] ** 2).sqrt() - major
        return minor - (ring**2 + p[..., 1] ** 2).sqrt()

    return sdf
