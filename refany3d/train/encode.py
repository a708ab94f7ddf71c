"""Latent and text-embedding cache, and the batches the model trains on.

Every sample is encoded once (VAE latents of the target RGB, target point map and the N orbit views
of each kind; T5 + pooled CLIP embeddings of the caption) and stored in the artifact store as one
safetensors object, keyed by the row's content (a hash of the cells the encoders read: caption,
image, point map, the orbit views) + encoder identity (the base weights) + the preprocessing that
decides the tensors (resolutions, views, text tokens, dtype); the sample id is no part of the key. Later epochs and later runs on
the same dataset load it instead of re-encoding. Nothing is unpickled: safetensors only.

Dropout happens after the cache, on the encodings: a dropped text is the empty prompt's encoding;
dropped references are `blank_references` (black views, also sampling's unconditional image
branch), both computed once per run.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from refany3d.config import TrainSettings
from refany3d.models.flux.components import (
    FluxComponents,
    blank_references,
    encode_images,
    encode_prompts,
)
from refany3d.models.flux.loss import FlowBatch
from refany3d.storage.store import ArtifactStore
from refany3d.train.data import Item, RawSample

logger = logging.getLogger("refany3d.train")

CACHE_VERSION = 2  # bump when what an entry holds changes
TENSORS = ("target_rgb", "target_point_map", "cond_rgb", "cond_point_map", "text", "pooled")


def preprocessing_key(settings: TrainSettings, components: FluxComponents) -> str:
    """Hash of everything besides the sample that decides its cached tensors."""
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "encoders": components.identity,
            "resolution": settings.data.resolution,
            "condition_resolution": settings.data.condition_resolution,
            "views": settings.model.num_views,
            "text_tokens": components.text_tokens,
            "dtype": str(next(components.vae.parameters()).dtype),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_key(content: str, preprocessing: str) -> str:
    """`<preprocessing>/<content>`: `content` is the row's `data.content_key` (its encoder cells'
    hash), never the sample id, so a rebuild that changes a row's images or caption re-encodes it."""
    return f"{preprocessing}/{content}"


class LatentCache:
    """Encodings by key in an artifact store (`<root>/<preprocessing>/<sample hash>.safetensors`)."""

    def __init__(self, root: str):
        self.root = root
        self._store: ArtifactStore | None = None

    def __reduce__(self):  # data-loader workers rebuild it from the URL
        return (LatentCache, (self.root,))

    @property
    def store(self) -> ArtifactStore:
        if self._store is None:
            self._store = ArtifactStore(self.root)
        return self._store

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        name = f"{key}.safetensors"
        try:
            if not self.store.exists(name):
                return None
            return load_tensors(self.store.get(name))
        except Exception as err:  # noqa: BLE001 - a broken entry is re-encoded, not fatal
            logger.warning("latent cache entry %s unreadable (%s); encoding again", name, err)
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        blob = save_tensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
        self.store.put(f"{key}.safetensors", blob)


# --------------------------------------------------------------------------- encoding


def encode_sample(components: FluxComponents, raw: RawSample) -> dict[str, torch.Tensor]:
    """One decoded sample -> its cached tensors (CPU): target_rgb / target_point_map (Lt, 64),
    cond_rgb / cond_point_map (N, Lc, 64), text (T, D), pooled (P,)."""
    targets = encode_images(components, torch.stack([raw.image, raw.point_map]))
    out = {"target_rgb": targets[0], "target_point_map": targets[1]}
    views = raw.views_rgb.shape[0]
    if views:
        conds = encode_images(components, torch.cat([raw.views_rgb, raw.views_point_map]))
        out["cond_rgb"], out["cond_point_map"] = conds[:views], conds[views:]
    text, pooled = encode_prompts(components, [raw.caption])
    out["text"], out["pooled"] = text[0], pooled[0]
    return {k: v.to("cpu") for k, v in out.items()}


def dropout_encodings(components: FluxComponents, settings: TrainSettings) -> dict[str, torch.Tensor]:
    """Encodings that replace dropped parts: the empty prompt, and blank references
    (`blank_references`, the same latents sampling's image-guidance pass uses)."""
    text, pooled = encode_prompts(components, [""])
    out = {"text": text[0].cpu(), "pooled": pooled[0].cpu()}
    views, size = settings.model.num_views, settings.data.condition_resolution
    if views:
        out["cond_rgb"] = out["cond_point_map"] = blank_references(components, views, size).cpu()
    return out


def item_encodings(
    item: Item, components: FluxComponents, cache: LatentCache | None
) -> tuple[dict[str, torch.Tensor], bool]:
    """The item's encodings and whether they were computed now (a cache miss, then stored)."""
    if item.cached is not None:
        return item.cached, False
    encoded = encode_sample(components, item.raw)
    if cache is not None:
        cache.put(item.cache_key, encoded)
    return encoded, True


def flow_batch(
    encodings: list[dict[str, torch.Tensor]],
    items: list[Item],
    drops: dict[str, torch.Tensor],
    settings: TrainSettings,
    device: torch.device,
    dtype: torch.dtype,
) -> FlowBatch:
    """Stack per-sample encodings into a FlowBatch, with each item's text / reference dropout."""

    def stack(name: str, dropped: list[bool]) -> torch.Tensor:
        parts = [drops[name] if drop else enc[name] for enc, drop in zip(encodings, dropped)]
        return torch.stack(parts).to(device=device, dtype=dtype, non_blocking=True)

    no_drop = [False] * len(items)
    text_drop = [i.drop_text for i in items]
    ref_drop = [i.drop_references for i in items]
    side = _grid(encodings[0]["target_rgb"].shape[0], settings.data.resolution)
    point_map = settings.model.point_map_branch
    views = settings.model.num_views
    cond_size = _grid(drops["cond_rgb"].shape[1], settings.data.condition_resolution) if views else None
    return FlowBatch(
        target_rgb=stack("target_rgb", no_drop),
        text=stack("text", text_drop),
        pooled=stack("pooled", text_drop),
        target_size=side,
        target_point_map=stack("target_point_map", no_drop) if point_map else None,
        cond_rgb=stack("cond_rgb", ref_drop) if views else None,
        cond_point_map=stack("cond_point_map", ref_drop) if views and point_map else None,
        cond_size=cond_size,
    )


def _grid(tokens: int, resolution: int) -> tuple[int, int]:
    """(h, w) of a square image's packed latent grid from its token count."""
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"{tokens} tokens of a {resolution} px image are not a square grid")
    return side, side
