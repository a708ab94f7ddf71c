"""RefAny3D sampling pipeline: a 3D asset + a prompt -> a generated image and its point map.

    pipe = RefAny3DPipeline.from_pretrained(SampleSettings(), lora="out/train")
    out = pipe("chair.glb", "a wooden chair in a sunny garden", seed=0)
    out.save("out/samples/chair")     # image.png, point_map.png, contact_sheet.png, ...

Steps: load and normalise the asset, render its N orbit views (RGB + canonical point map) with the
dataset's renderer, VAE-encode them, encode the prompt (T5 + CLIP), run the flow-matching Euler
sampler (sampler.py), and VAE-decode both targets. The network and its encoders come from
`load_components` (FLUX.1-dev from `model.pretrained`, or the embedded tiny default); trained
adapters from a training run's newest checkpoint, one checkpoint, or an adapter directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh

from refany3d.config import SampleSettings, SettingsError, override, to_dict
from refany3d.models.flux.components import (
    FluxComponents,
    blank_references,
    decode_latents,
    encode_images,
    encode_prompts,
    load_components,
)
from refany3d.models.flux.io import load_adapters
from refany3d.models.flux.sampler import Conditions, sample_latents
from refany3d.render.mesh import mesh_to_glb, normalize_mesh
from refany3d.sampling.assets import ConditionViews, load_asset, render_conditions
from refany3d.sampling.sheet import contact_sheet, to_uint8
from refany3d.train.checkpoint import CHECKPOINTS, read_config, resolve_adapters, settings_from_config

__all__ = ["RefAny3DPipeline", "SampleOutput", "resolve_adapters"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAMPLE_JSON = "sample.json"  # what `refany3d evaluate` reads back


@dataclass(frozen=True)
class SampleOutput:
    """image (S, S, 3) uint8; point_map (S, S, 3) float32 in [0, 1] over `mesh`'s bounding box,
    white background (None without the point-map branch); views: the conditions; mesh: the
    normalised asset (the frame the point map encodes); label: where the weights came from;
    provenance: the run, checkpoint, step, base model and settings (`RefAny3DPipeline.source`)."""

    image: np.ndarray
    point_map: np.ndarray | None
    views: ConditionViews
    mesh: trimesh.Trimesh
    prompt: str
    seed: int
    label: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def contact_sheet(self) -> np.ndarray:
        return contact_sheet(self.views.rgb, self.views.point_maps, self.image, self.point_map)

    def save(self, directory: str | os.PathLike, settings: SampleSettings | None = None) -> Path:
        """Write image.png, point_map.png (8-bit) + point_map16.png, contact_sheet.png, asset.glb
        (the normalised mesh), views/rgb_KK.png + views/point_map_KK.png and sample.json."""
        from PIL import Image

        out = Path(directory)
        (out / "views").mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.image).save(out / "image.png")
        if self.point_map is not None:
            Image.fromarray(to_uint8(self.point_map)).save(out / "point_map.png")
            _write_png16(out / "point_map16.png", self.point_map)
        Image.fromarray(self.contact_sheet()).save(out / "contact_sheet.png")
        (out / "asset.glb").write_bytes(mesh_to_glb(self.mesh))
        for k, (rgb, pm) in enumerate(zip(self.views.rgb, self.views.point_maps)):
            Image.fromarray(rgb).save(out / "views" / f"rgb_{k:02d}.png")
            Image.fromarray(to_uint8(pm)).save(out / "views" / f"point_map_{k:02d}.png")
        meta = {"prompt": self.prompt, "seed": self.seed, "label": self.label, "views": len(self.views.rgb)}
        meta.update(self.provenance)
        if settings is not None:
            meta["settings"] = to_dict(settings)
        (out / SAMPLE_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return out


def _checkpoint_settings(
    settings: SampleSettings, config: dict[str, Any] | None, explicit: frozenset[str], where: str
) -> SampleSettings:
    """`settings` with the checkpoint's model flags, the orbit rendering as many views as it was
    trained with; SettingsError naming a user's setting that conflicts."""
    model, _ = settings_from_config(settings.model, config, explicit, where)
    settings = dataclasses.replace(settings, model=model)
    if config and settings.render.views != model.num_views:
        if "render.views" in explicit:
            raise SettingsError(
                f"render.views: {settings.render.views} views were asked, but {where} was trained "
                f"with {model.num_views}; drop the override (the checkpoint's config.json sets it)"
            )
        settings = override(settings, **{"render.views": model.num_views})
    return settings


def _write_png16(path: Path, unit: np.ndarray) -> None:
    import cv2  # PIL cannot write 16-bit RGB

    rgb16 = np.round(np.clip(unit, 0, 1) * 65535.0).astype(np.uint16)
    cv2.imwrite(str(path), np.ascontiguousarray(rgb16[..., ::-1]))


class RefAny3DPipeline:
    """Generates images of 3D assets; build once (weights load once), call per asset and prompt."""

    def __init__(
        self, components: FluxComponents, settings: SampleSettings, source: dict[str, Any] | None = None
    ):
        side = 2 * components.vae_scale_factor  # pixels per packed latent token
        for name, value in (
            ("sampler.resolution", settings.sampler.resolution),
            ("render.resolution", settings.render.resolution),
        ):
            if value % side:
                raise SettingsError(f"{name}: {value} is not a multiple of {side} (one latent token)")
        self.components = components
        self.settings = settings
        # where the weights came from (sample.json): run, checkpoint, step, base model
        self.source = source or {"run": None, "checkpoint": None, "step": None}
        self.source = {**self.source, "base": self._base(components, settings)}
        self._token_px = side

    @staticmethod
    def _base(components: FluxComponents, settings: SampleSettings) -> dict[str, Any]:
        return {
            "name_or_path": settings.model.pretrained,
            "label": components.label,
            "fingerprint": components.identity,
        }

    @classmethod
    def from_pretrained(
        cls,
        settings: SampleSettings,
        lora: str | os.PathLike | None = None,
        explicit: frozenset[str] = frozenset(),
    ) -> RefAny3DPipeline:
        """Load the network and encoders of `settings.model`, then the adapters of `lora` (None =
        untrained adapters: the base model's behaviour, for smoke tests). The model flags come from
        the checkpoint's config.json; one the user set (`model.<flag>` in `explicit`) to another
        value is a SettingsError naming it, before any weights load."""
        adapters, manifest = resolve_adapters(lora) if lora is not None else (None, {})
        source = {"run": None, "checkpoint": None, "step": None}
        if adapters is not None:
            settings = _checkpoint_settings(
                settings, read_config(adapters), explicit, f"--lora {str(lora)!r}"
            )
            checkpoint = adapters.parent if adapters.name == "adapters" else adapters
            run = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None
            source = {"run": run and str(run), "checkpoint": str(checkpoint), "step": manifest.get("step")}
        device, dtype = settings.runtime.device, DTYPES[settings.runtime.dtype]
        components = load_components(settings.model, device, dtype)
        if manifest.get("base", components.label) != components.label:
            raise SettingsError(
                f"--lora {str(lora)!r} was trained on {manifest['base']!r}, but model.pretrained gives "
                f"{components.label!r}; set model.pretrained to the base it was trained on"
            )
        if adapters is not None:
            load_adapters(components.transformer, adapters)
        components.transformer.eval()
        return cls(components, settings, source)

    def __call__(
        self, asset: str | os.PathLike | trimesh.Trimesh, prompt: str, seed: int | None = None
    ) -> SampleOutput:
        """One sample of `asset` (a mesh file or a `trimesh.Trimesh`) for `prompt`; `seed` defaults
        to `sampler.seed`. The same inputs and settings give the same output."""
        s = self.settings
        seed = s.sampler.seed if seed is None else seed
        mesh = load_asset(asset) if not isinstance(asset, trimesh.Trimesh) else normalize_mesh(asset)[0]
        views = render_conditions(mesh, s.render)
        text, pooled = encode_prompts(self.components, [prompt])
        cond_side = s.render.resolution // self._token_px
        target_side = s.sampler.resolution // self._token_px
        conditions = Conditions(
            rgb=self._encode([v / 255.0 for v in views.rgb]),
            point_map=self._encode(views.point_maps)
            if self.components.transformer.point_map_branch
            else None,
            size=(cond_side, cond_side),
        )
        blank = None
        if s.sampler.image_guidance != 1.0:  # the references training's dropout blanked
            lat = blank_references(self.components, len(views.rgb), s.render.resolution)[None]
            lat = lat.to(conditions.rgb)
            blank = Conditions(lat, None if conditions.point_map is None else lat, conditions.size)
        latents = sample_latents(
            self.components.transformer,
            text,
            pooled,
            conditions,
            (target_side, target_side),
            steps=s.sampler.steps,
            guidance=s.sampler.guidance,
            image_guidance=s.sampler.image_guidance,
            generator=torch.Generator().manual_seed(seed),
            cache_conditions=s.sampler.cache_conditions,
            blank=blank,
        )
        image = to_uint8(self._decode(latents.rgb, target_side))
        point_map = None if latents.point_map is None else self._decode(latents.point_map, target_side)
        provenance = {**self.source, "settings": to_dict(s)}
        return SampleOutput(image, point_map, views, mesh, prompt, seed, self.components.label, provenance)

    def _encode(self, images: list[np.ndarray]) -> torch.Tensor:
        """N (R, R, 3) float images in [0, 1] -> (1, N, Lc, C) packed latents."""
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() * 2.0 - 1.0
        return encode_images(self.components, batch)[None]

    def _decode(self, tokens: torch.Tensor, side: int) -> np.ndarray:
        """(1, Lt, C) packed latents -> (S, S, 3) float32 in [0, 1]."""
        image = decode_latents(self.components, tokens, (side, side))[0]
        return ((image.float().permute(1, 2, 0).cpu().numpy() + 1.0) / 2.0).clip(0.0, 1.0).astype(np.float32)
