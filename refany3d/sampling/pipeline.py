"""RefAny3D sampling pipeline: a 3D asset + a prompt -> a generated image and its point map.

    pipe = RefAny3DPipeline.from_pretrained("out/train", base="/models/FLUX.1-dev",
                                            torch_dtype=torch.bfloat16).to("cuda")
    out = pipe("chair.glb", "a wooden chair in a sunny garden",
               num_inference_steps=28, guidance_scale=3.5, generator=torch.Generator().manual_seed(0))
    out.images[0], out.point_maps[0]  # PIL images; out.image / out.point_map: the arrays
    out.save("out/samples/chair")     # image.png, point_map.png, contact_sheet.png, ...
    pipe.save_pretrained("out/export")  # adapters + config.json + README.md: from_pretrained reads it

Steps: load and normalise the asset, render its N orbit views (RGB + canonical point map) with the
dataset's renderer, VAE-encode them, encode the prompt (T5 + CLIP), run the flow-matching Euler
sampler (sampler.py), and VAE-decode both targets. The network and its encoders come from
`load_components` (FLUX.1-dev from `model.pretrained`, or the embedded tiny default); trained
adapters from a training run's newest checkpoint, one checkpoint, a `save_pretrained` directory, or
an adapter directory; the model flags and sampling defaults from the checkpoint's config.json.
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
    cast_module,
    decode_latents,
    encode_images,
    encode_prompts,
    load_components,
)
from refany3d.models.flux.io import load_adapters, save_adapters
from refany3d.models.flux.sampler import Conditions, sample_latents
from refany3d.render.mesh import mesh_to_glb, normalize_mesh
from refany3d.sampling.assets import ConditionViews, load_asset, render_conditions
from refany3d.sampling.sheet import contact_sheet, to_uint8
from refany3d.train.checkpoint import (
    CHECKPOINTS,
    CONFIG,
    FORMAT,
    MANIFEST,
    MODEL_CARD,
    MODEL_FLAGS,
    PIPELINE_KEYS,
    model_card,
    model_config,
    pipeline_defaults,
    read_config,
    resolve_adapters,
    settings_from_config,
)

__all__ = ["RefAny3DPipeline", "SampleOutput", "resolve_adapters"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAMPLE_JSON = "sample.json"  # what `refany3d evaluate` reads back


@dataclass(frozen=True)
class SampleOutput:
    """What `RefAny3DPipeline.__call__` returns: `images[0]` / `point_maps[0]` as PIL images, and
    the arrays: image (S, S, 3) uint8; point_map (S, S, 3) float32 in [0, 1] over `mesh`'s bounding box,
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

    @property
    def images(self) -> list[Any]:
        """The generated RGB as a PIL image in a list (diffusers' `.images[0]`)."""
        from PIL import Image

        return [Image.fromarray(self.image)]

    @property
    def point_maps(self) -> list[Any]:
        """The generated point map as an 8-bit PIL RGB image in a list (empty without the branch)."""
        from PIL import Image

        return [] if self.point_map is None else [Image.fromarray(to_uint8(self.point_map))]

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
    """`settings` with the checkpoint's model flags and sampling defaults (`config["pipeline"]`: the
    resolutions it was trained at, its steps and guidance; a key the user set wins), the orbit
    rendering as many views as it was trained with; SettingsError naming a user's model flag that
    conflicts."""
    model, _ = settings_from_config(settings.model, config, explicit, where)
    settings = dataclasses.replace(settings, model=model)
    if not config:
        return settings
    defaults = {
        k: v for k, v in config.get("pipeline", {}).items() if k in PIPELINE_KEYS and k not in explicit
    }
    settings = override(settings, **defaults)
    if settings.render.views != model.num_views:
        if "render.views" in explicit:
            raise SettingsError(
                f"render.views: {settings.render.views} views were asked, but {where} was trained "
                f"with {model.num_views}; drop the override (the checkpoint's config.json sets it)"
            )
        settings = override(settings, **{"render.views": model.num_views})
    return settings


def _changed_keys(settings: Any, default: Any, prefix: str = "") -> frozenset[str]:
    """Dotted keys where `settings` differs from `default` (what a Python caller chose)."""
    keys: set[str] = set()
    for f in dataclasses.fields(settings):
        mine, theirs = getattr(settings, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(mine):
            keys |= _changed_keys(mine, theirs, f"{prefix}{f.name}.")
        elif mine != theirs:
            keys.add(f"{prefix}{f.name}")
    return frozenset(keys)


def _dtype_name(torch_dtype: torch.dtype | str) -> str:
    names = {v: k for k, v in DTYPES.items()}
    if isinstance(torch_dtype, str):
        name = torch_dtype.removeprefix("torch.")
        if name in DTYPES:
            return name
    elif torch_dtype in names:
        return names[torch_dtype]
    raise SettingsError(f"torch_dtype: {torch_dtype!r} is not one of {', '.join(DTYPES)}")


def _write_png16(path: Path, unit: np.ndarray) -> None:
    import cv2  # PIL cannot write 16-bit RGB

    rgb16 = np.round(np.clip(unit, 0, 1) * 65535.0).astype(np.uint16)
    cv2.imwrite(str(path), np.ascontiguousarray(rgb16[..., ::-1]))


class RefAny3DPipeline:
    """Generates images of 3D assets; build once (weights load once), call per asset and prompt.

    The diffusers-style surface: `from_pretrained(checkpoint, base=..., torch_dtype=...)`,
    `.to(device)`, `__call__(asset, prompt, num_inference_steps=, guidance_scale=, generator=)`,
    `load_lora_weights(checkpoint)` and `save_pretrained(dir)`."""

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
        self.source = {"run": None, "checkpoint": None, "step": None, **(source or {})}
        self.source["base"] = self._base(components, settings)
        self._token_px = side

    @staticmethod
    def _base(components: FluxComponents, settings: SampleSettings) -> dict[str, Any]:
        return {
            "name_or_path": settings.model.pretrained,
            "label": components.label,
            "fingerprint": components.identity,
        }

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike | None = None,
        *,
        base: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        settings: SampleSettings | None = None,
        explicit: frozenset[str] | None = None,
    ) -> RefAny3DPipeline:
        """The base components and the adapters of `checkpoint`: a training run (its newest
        checkpoint), one checkpoint, a `save_pretrained` directory, an adapter directory or a
        promotion pointer; None = untrained adapters (the base model's behaviour, a smoke test).

        `base`: the base model (`model.pretrained`: a FLUX.1-dev snapshot directory or cached hub
        id; "" = the embedded tiny model); None = the one the checkpoint's config.json names. The
        model flags and sampling defaults come from config.json; `settings` gives the rest, and a
        model flag in `explicit` (default: the keys where `settings` differs from the defaults) set
        to another value than the checkpoint's is a SettingsError naming it, before weights load.
        Adapters trained on other base weights (another fingerprint) are refused."""
        settings = settings or SampleSettings()
        explicit = _changed_keys(settings, SampleSettings()) if explicit is None else explicit
        adapters, manifest = resolve_adapters(checkpoint) if checkpoint is not None else (None, {})
        config = read_config(adapters) if adapters is not None else None
        if base is None and config and "model.pretrained" not in explicit:
            base = config.get("base", {}).get("name_or_path")
        changes: dict[str, Any] = {}
        if base is not None:
            changes["model.pretrained"] = base
        if torch_dtype is not None:
            changes["runtime.dtype"] = _dtype_name(torch_dtype)
        if device is not None:
            changes["runtime.device"] = str(device)
        settings = override(settings, **changes)
        if adapters is not None:
            settings = _checkpoint_settings(settings, config, explicit, f"--lora {str(checkpoint)!r}")
        dtype = DTYPES[settings.runtime.dtype]
        components = load_components(settings.model, settings.runtime.device, dtype)
        pipe = cls(components, settings)
        if adapters is not None:
            pipe._load(checkpoint, adapters, manifest, config)
        components.transformer.eval()
        return pipe

    def load_lora_weights(self, checkpoint: str | os.PathLike) -> RefAny3DPipeline:
        """Swap in the adapters of `checkpoint` (as `from_pretrained` takes it). They must have been
        trained with this pipeline's model flags and base: a SettingsError naming the first
        difference otherwise."""
        adapters, manifest = resolve_adapters(checkpoint)
        config = read_config(adapters)
        where = f"--lora {str(checkpoint)!r}"
        everything = frozenset(f"model.{flag}" for flag in MODEL_FLAGS)  # the built model's: fixed
        settings_from_config(
            self.settings.model, config, everything, where, fix="load it with from_pretrained"
        )
        self._load(checkpoint, adapters, manifest, config)
        return self

    def _load(
        self, checkpoint, adapters: Path, manifest: dict[str, Any], config: dict[str, Any] | None
    ) -> None:
        label, identity = self.components.label, self.components.identity
        trained = (config or {}).get("base", {})
        where = f"--lora {str(checkpoint)!r}"
        if trained.get("fingerprint") and trained["fingerprint"] != identity:
            raise SettingsError(
                f"{where} was trained on {trained.get('label')!r} (fingerprint {trained['fingerprint']}), "
                f"but the base is {label!r} (fingerprint {identity}); pass base= / model.pretrained "
                "of the weights it was trained on"
            )
        if not trained.get("fingerprint") and manifest.get("base", label) != label:
            raise SettingsError(
                f"{where} was trained on {manifest['base']!r}, but model.pretrained gives "
                f"{label!r}; set model.pretrained to the base it was trained on"
            )
        load_adapters(self.components.transformer, adapters)
        self.components.transformer.eval()
        found = adapters.parent if adapters.name == "adapters" else adapters
        run = found.parent.parent if found.parent.name == CHECKPOINTS else None
        self.source = {
            **self.source,
            "run": run and str(run),
            "checkpoint": str(found),
            "step": manifest.get("step"),
            "dataset_version": manifest.get("dataset_version"),
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the adapters (peft safetensors), config.json (model flags, adapters, switcher, base,
        and this pipeline's sampling defaults), README.md (model card) and manifest.json under
        `directory`; `from_pretrained(directory)` reads it back. The base weights are not copied:
        config.json names them (id or path and fingerprint)."""
        out = Path(directory)
        model = self.components.transformer
        base = self.source["base"]
        config = model_config(self.settings.model, model, base, pipeline_defaults(self.settings))
        manifest = {
            "format": FORMAT,
            "step": self.source.get("step"),
            "base": self.components.label,
            "dataset_version": self.source.get("dataset_version"),
            "from": self.source.get("checkpoint"),
        }
        save_adapters(model, out / "adapters", base["name_or_path"] or base["label"])
        (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        (out / MODEL_CARD).write_text(model_card(config, {**manifest, "step": manifest["step"] or 0}))
        manifest["files"] = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return out

    # ------------------------------------------------------------------ device and precision

    @property
    def device(self) -> torch.device:
        return next(self.components.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.components.transformer.parameters()).dtype

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
    ) -> RefAny3DPipeline:
        """Move (and cast) the network and encoders, as `DiffusionPipeline.to`; returns self."""
        changes: dict[str, Any] = {}
        if device is not None:
            changes["runtime.device"] = str(device)
        if dtype is not None:
            changes["runtime.dtype"] = _dtype_name(dtype)
        self.settings = override(self.settings, **changes)
        c, target = self.components, DTYPES[self.settings.runtime.dtype]
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            setattr(c, name, cast_module(getattr(c, name), self.settings.runtime.device, target))
        return self

    # ------------------------------------------------------------------ generating

    def __call__(
        self,
        asset: str | os.PathLike | trimesh.Trimesh,
        prompt: str,
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> SampleOutput:
        """One sample of `asset` (a mesh file or a `trimesh.Trimesh`) for `prompt`.

        num_inference_steps / guidance_scale / image_guidance_scale default to `sampler.steps` /
        `sampler.guidance` / `sampler.image_guidance`; the initial noise comes from `generator`
        (as diffusers' pipelines), else from `seed`, else `sampler.seed`. The same inputs and
        settings give the same output. AssetError for an asset that cannot be a condition."""
        mesh = load_asset(asset) if not isinstance(asset, trimesh.Trimesh) else normalize_mesh(asset)[0]
        views = render_conditions(mesh, self.settings.render)
        if generator is None:
            generator = torch.Generator().manual_seed(self.settings.sampler.seed if seed is None else seed)
        used = generator.initial_seed()
        image, point_map = self.generate(
            views, prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale, generator=generator,
        )  # fmt: skip
        s = override(
            self.settings,
            **{
                "sampler.steps": num_inference_steps or self.settings.sampler.steps,
                "sampler.guidance": self.settings.sampler.guidance
                if guidance_scale is None
                else guidance_scale,
                "sampler.image_guidance": self.settings.sampler.image_guidance
                if image_guidance_scale is None
                else image_guidance_scale,
            },
        )
        provenance = {**self.source, "settings": to_dict(s)}
        return SampleOutput(image, point_map, views, mesh, prompt, used, self.components.label, provenance)

    @torch.no_grad()
    def generate(
        self,
        views: ConditionViews,
        prompt: str,
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(image (S, S, 3) uint8, point map (S, S, 3) float32 in [0, 1] or None without the point-map
        branch) from already rendered condition views (e.g. a dataset row's) and `prompt`."""
        s = self.settings.sampler
        steps = num_inference_steps or s.steps
        guidance = s.guidance if guidance_scale is None else guidance_scale
        image_guidance = s.image_guidance if image_guidance_scale is None else image_guidance_scale
        text, pooled = encode_prompts(self.components, [prompt])
        resolution = views.rgb[0].shape[0] if views.rgb else self.settings.render.resolution
        cond_side = resolution // self._token_px
        target_side = s.resolution // self._token_px
        conditions = None
        if views.rgb:
            conditions = Conditions(
                rgb=self._encode([v / 255.0 for v in views.rgb]),
                point_map=self._encode(views.point_maps)
                if self.components.transformer.point_map_branch
                else None,
                size=(cond_side, cond_side),
            )
        blank = None
        if conditions is not None and image_guidance != 1.0:  # the references training's dropout blanked
            lat = blank_references(self.components, len(views.rgb), resolution)[None]
            lat = lat.to(conditions.rgb)
            blank = Conditions(lat, None if conditions.point_map is None else lat, conditions.size)
        latents = sample_latents(
            self.components.transformer, text, pooled, conditions, (target_side, target_side),
            steps=steps, guidance=guidance, image_guidance=image_guidance,
            generator=generator if generator is not None else torch.Generator().manual_seed(s.seed),
            cache_conditions=s.cache_conditions, blank=blank,
        )  # fmt: skip
        image = to_uint8(self._decode(latents.rgb, target_side))
        point_map = None if latents.point_map is None else self._decode(latents.point_map, target_side)
        return image, point_map

    def _encode(self, images: list[np.ndarray]) -> torch.Tensor:
        """N (R, R, 3) float images in [0, 1] -> (1, N, Lc, C) packed latents."""
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() * 2.0 - 1.0
        return encode_images(self.components, batch)[None]

    def _decode(self, tokens: torch.Tensor, side: int) -> np.ndarray:
        """(1, Lt, C) packed latents -> (S, S, 3) float32 in [0, 1]."""
        image = decode_latents(self.components, tokens, (side, side))[0]
        return ((image.float().permute(1, 2, 0).cpu().numpy() + 1.0) / 2.0).clip(0.0, 1.0).astype(np.float32)
