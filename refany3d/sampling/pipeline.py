"""RefAny3D sampling pipeline: a 3D asset + a prompt -> a generated image and its point map.

    pipe = RefAny3DPipeline.from_pretrained("out/train", base="/models/FLUX.1-dev",
                                            torch_dtype=torch.bfloat16).to("cuda")
    out = pipe("chair.glb", "a wooden chair in a sunny garden", height=512, width=768,
               num_inference_steps=28, guidance_scale=3.5, num_images_per_prompt=2,
               generator=torch.Generator().manual_seed(0))
    out.images, out.point_maps        # 2 PIL images each; out.image_arrays / .point_map_arrays
    out.save("out/samples/chair")     # 00/ and 01/: image.png, point_map.png, contact_sheet.png, ...
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
import numbers
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
    """What `RefAny3DPipeline.__call__` returns: n = len(prompts) x num_images_per_prompt samples of
    one asset. `images` / `point_maps`: the n as PIL images (diffusers' `.images`); the arrays:
    image_arrays n (H, W, 3) uint8; point_map_arrays n (H, W, 3) float32 in [0, 1] over `mesh`'s
    bounding box, white background (empty without the point-map branch); prompts: each image's
    prompt; views: the conditions; mesh: the normalised asset (the frame the point maps encode);
    seed: the generator's initial seed; label: where the weights came from; provenance: the run,
    checkpoint, step, base model, size and settings (`RefAny3DPipeline.source`).

    `image` / `point_map` / `prompt`: the first sample's (the only one for n = 1); `sample(k)`: the
    k-th alone."""

    image_arrays: tuple[np.ndarray, ...]
    point_map_arrays: tuple[np.ndarray, ...]
    views: ConditionViews
    mesh: trimesh.Trimesh
    prompts: tuple[str, ...]
    seed: int
    label: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_arrays)

    @property
    def image(self) -> np.ndarray:
        return self.image_arrays[0]

    @property
    def point_map(self) -> np.ndarray | None:
        return self.point_map_arrays[0] if self.point_map_arrays else None

    @property
    def prompt(self) -> str:
        return self.prompts[0]

    @property
    def images(self) -> list[Any]:
        """The n generated RGB images as PIL images (diffusers' `.images`)."""
        from PIL import Image

        return [Image.fromarray(image) for image in self.image_arrays]

    @property
    def point_maps(self) -> list[Any]:
        """The n generated point maps as 8-bit PIL RGB images (empty without the branch)."""
        from PIL import Image

        return [Image.fromarray(to_uint8(pm)) for pm in self.point_map_arrays]

    def sample(self, index: int) -> SampleOutput:
        """The `index`-th sample alone; its provenance names its place (`image_index`, `num_images`)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sample({index}): this output holds {n} image(s)")
        index %= n
        return dataclasses.replace(
            self,
            image_arrays=self.image_arrays[index : index + 1],
            point_map_arrays=self.point_map_arrays[index : index + 1],
            prompts=self.prompts[index : index + 1],
            provenance={**self.provenance, "image_index": index, "num_images": n},
        )

    def contact_sheet(self) -> np.ndarray:
        """The first sample's: views | RGB | point map (`sheet.contact_sheet`)."""
        return contact_sheet(self.views.rgb, self.views.point_maps, self.image, self.point_map)

    def save(self, directory: str | os.PathLike, settings: SampleSettings | None = None) -> Path:
        """Write image.png, point_map.png (8-bit) + point_map16.png, contact_sheet.png, asset.glb
        (the normalised mesh), views/rgb_KK.png + views/point_map_KK.png and sample.json; with
        n > 1 samples, one such directory per sample: `directory/KK/` (what `refany3d evaluate
        --samples directory` finds)."""
        from PIL import Image

        out = Path(directory)
        if len(self) > 1:
            for k in range(len(self)):
                self.sample(k).save(out / f"{k:02d}", settings)
            return out
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


def _is_int(value: Any) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _prompt_list(prompt: str | list[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt: {prompt!r} is not a string or a non-empty list of strings")
    return prompts


def _write_png16(path: Path, unit: np.ndarray) -> None:
    import cv2  # PIL cannot write 16-bit RGB

    rgb16 = np.round(np.clip(unit, 0, 1) * 65535.0).astype(np.uint16)
    cv2.imwrite(str(path), np.ascontiguousarray(rgb16[..., ::-1]))


class RefAny3DPipeline:
    """Generates images of 3D assets; build once (weights load once), call per asset and prompt.

    The diffusers-style surface: `from_pretrained(checkpoint, base=..., torch_dtype=...)`,
    `.to(device)`, `__call__(asset, prompt, height=, width=, num_inference_steps=, guidance_scale=,
    num_images_per_prompt=, generator=)`, `load_lora_weights(checkpoint)` and `save_pretrained(dir)`."""

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
        prompt: str | list[str],
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> SampleOutput:
        """Samples of `asset` (a mesh file or a `trimesh.Trimesh`) for `prompt` (one, or a list: each
        gets `num_images_per_prompt` images, prompt by prompt, as in diffusers).

        height / width: the generated size in px (default `sampler.resolution`, the size the
        checkpoint was trained at), each a positive multiple of one latent token's pixels (16 for
        FLUX.1-dev: the VAE's 8 px x the 2 x 2 patch); ValueError naming the argument otherwise.
        num_inference_steps / guidance_scale / image_guidance_scale default to `sampler.steps` /
        `sampler.guidance` / `sampler.image_guidance`. All images are drawn in one batch; the initial
        noise comes from `generator` (as diffusers' pipelines), else from `seed`, else
        `sampler.seed`, one image after the other, so the same seed gives the same images (and the
        first of n is the one n = 1 draws). The same inputs and settings give the same output.
        AssetError for an asset that cannot be a condition."""
        prompts = _prompt_list(prompt)
        if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: {num_images_per_prompt!r} is not a positive int")
        grid = self._target_grid(height, width)  # a bad size fails before the asset renders
        mesh = load_asset(asset) if not isinstance(asset, trimesh.Trimesh) else normalize_mesh(asset)[0]
        views = render_conditions(mesh, self.settings.render)
        if generator is None:
            generator = torch.Generator().manual_seed(self.settings.sampler.seed if seed is None else seed)
        used = generator.initial_seed()
        images, point_maps = self._generate(
            views, prompts, int(num_images_per_prompt), grid, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale, generator=generator,
        )  # fmt: skip
        sampler = self.settings.sampler
        ran = {
            "sampler.steps": num_inference_steps or sampler.steps,
            "sampler.guidance": sampler.guidance if guidance_scale is None else guidance_scale,
            "sampler.image_guidance": sampler.image_guidance
            if image_guidance_scale is None
            else image_guidance_scale,
        }
        size = (grid[0] * self._token_px, grid[1] * self._token_px)
        if size[0] == size[1]:
            ran["sampler.resolution"] = size[0]
        provenance = {
            **self.source,
            "height": size[0],
            "width": size[1],
            "settings": to_dict(override(self.settings, **ran)),
        }
        return SampleOutput(
            tuple(images),
            tuple(point_maps or ()),
            views,
            mesh,
            tuple(p for p in prompts for _ in range(num_images_per_prompt)),
            used,
            self.components.label,
            provenance,
        )

    def generate(
        self,
        views: ConditionViews,
        prompt: str,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(image (H, W, 3) uint8, point map (H, W, 3) float32 in [0, 1] or None without the
        point-map branch) from already rendered condition views (e.g. a dataset row's) and
        `prompt`; the arguments as in `__call__`."""
        grid = self._target_grid(height, width)
        images, point_maps = self._generate(
            views, [prompt], 1, grid, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale, generator=generator,
        )  # fmt: skip
        return images[0], None if point_maps is None else point_maps[0]

    def _target_grid(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(h, w) of the packed target latent grid of a height x width px image (None: the
        `sampler.resolution` side); ValueError naming a size that is not a positive multiple of
        one token's pixels. The model takes any such grid: its rotary ids, the conditions' shift
        by -w on the width axis and the schedule's shift (h * w tokens) all follow it."""
        side = self._token_px
        grid = []
        for name, value in (("height", height), ("width", width)):
            value = self.settings.sampler.resolution if value is None else value
            if not _is_int(value) or value < side or value % side:
                raise ValueError(
                    f"{name}: {value!r} is not a positive multiple of {side} px (one latent token: "
                    f"the VAE's {side // 2} px x the 2 x 2 patch)"
                )
            grid.append(int(value) // side)
        return grid[0], grid[1]

    @torch.no_grad()
    def _generate(
        self,
        views: ConditionViews,
        prompts: list[str],
        per_prompt: int,
        grid: tuple[int, int],
        *,
        num_inference_steps: int | None,
        guidance_scale: float | None,
        image_guidance_scale: float | None,
        generator: torch.Generator | None,
    ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """B = len(prompts) x per_prompt samples in one batch, prompt by prompt, on the packed target
        `grid` (h, w): (B (H, W, 3) uint8 images, B point maps or None without the branch)."""
        s = self.settings.sampler
        steps = num_inference_steps or s.steps
        guidance = s.guidance if guidance_scale is None else guidance_scale
        image_guidance = s.image_guidance if image_guidance_scale is None else image_guidance_scale
        text, pooled = encode_prompts(self.components, prompts)
        text, pooled = text.repeat_interleave(per_prompt, 0), pooled.repeat_interleave(per_prompt, 0)
        b = text.shape[0]
        resolution = views.rgb[0].shape[0] if views.rgb else self.settings.render.resolution
        cond_side = resolution // self._token_px
        conditions = None
        if views.rgb:
            rgb = self._encode([v / 255.0 for v in views.rgb])
            branch = self.components.transformer.point_map_branch
            point_map = self._encode(views.point_maps) if branch else None
            conditions = Conditions(
                rgb=rgb.expand(b, -1, -1, -1),
                point_map=None if point_map is None else point_map.expand(b, -1, -1, -1),
                size=(cond_side, cond_side),
            )
        blank = None
        if conditions is not None and image_guidance != 1.0:  # the references training's dropout blanked
            lat = blank_references(self.components, len(views.rgb), resolution)[None]
            lat = lat.to(conditions.rgb).expand(b, -1, -1, -1)
            blank = Conditions(lat, None if conditions.point_map is None else lat, conditions.size)
        latents = sample_latents(
            self.components.transformer, text, pooled, conditions, grid,
            steps=steps, guidance=guidance, image_guidance=image_guidance,
            generator=generator if generator is not None else torch.Generator().manual_seed(s.seed),
            cache_conditions=s.cache_conditions, blank=blank,
        )  # fmt: skip
        images = [to_uint8(image) for image in self._decode(latents.rgb, grid)]
        point_maps = None if latents.point_map is None else self._decode(latents.point_map, grid)
        return images, point_maps

    def _encode(self, images: list[np.ndarray]) -> torch.Tensor:
        """N (R, R, 3) float images in [0, 1] -> (1, N, Lc, C) packed latents."""
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() * 2.0 - 1.0
        return encode_images(self.components, batch)[None]

    def _decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> list[np.ndarray]:
        """(B, h*w, C) packed latents of an (h, w) grid -> B (H, W, 3) float32 in [0, 1]."""
        images = decode_latents(self.components, tokens, grid).float().permute(0, 2, 3, 1).cpu().numpy()
        return list(((images + 1.0) / 2.0).clip(0.0, 1.0).astype(np.float32))
