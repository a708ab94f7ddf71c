"""The paper's embedding metrics of one generated sample, on transformers' CLIP and DINOv2 classes.

The generated image is compared with its background removed (pixels off the generated point map's
foreground set to white, as the reference views are rendered on white). Cosine similarities:
- `clip_i_mean` / `clip_i_max` in [-1, 1], higher is better: CLIP image embedding of the generated
  image vs each reference view, averaged / best view.
- `clip_t` in [-1, 1], higher is better: CLIP image embedding vs the prompt's text embedding
  (the paper's CLIP-T is this x 100).
- `dino_mean` / `dino_max` in [-1, 1], higher is better: DINOv2 [CLS] embedding vs each view.

Weights load from a local directory (or a hub id already in the local Hugging Face cache), e.g.
`openai/clip-vit-large-patch14` and `facebook/dinov2-base` downloaded once with `hf download`. A
setting that is empty or names nothing present skips its metrics with a note, never an error.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

CLIP_METRICS = ("clip_i_mean", "clip_i_max", "clip_t")
DINO_METRICS = ("dino_mean", "dino_max")


def resolve_weights(setting: str, value: str, metrics: tuple[str, ...]) -> tuple[Path | None, str | None]:
    """(local directory, None) of a weights setting, or (None, a note: which metrics are skipped, why)."""
    skipped = f"{', '.join(metrics)} skipped"
    if not value:
        return None, f"{setting} is empty: {skipped} (set it to a local weights directory)"
    path = Path(value).expanduser()
    if path.is_dir():
        return path, None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(value, local_files_only=True)), None
    except Exception:  # noqa: BLE001 - anything but a local snapshot means "not here"
        return None, f"{setting}: {value!r} is not a directory or a hub id in the local cache: {skipped}"


class ClipScorer:
    """CLIP (`CLIPModel`, its tokenizer and image processor) from one directory."""

    def __init__(self, directory: Path, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(directory).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.processor = AutoImageProcessor.from_pretrained(directory)
        self.device = device

    @torch.no_grad()
    def images(self, images: list[np.ndarray]) -> torch.Tensor:
        """(n, D) unit embeddings of n (H, W, 3) uint8 images."""
        pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        return _unit(_features(self.model.get_image_features(pixel_values=pixels)))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """(n, D) unit embeddings of n prompts (truncated to the text model's positions)."""
        limit = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        return _unit(_features(self.model.get_text_features(input_ids=ids, attention_mask=mask)))


class DinoScorer:
    """DINOv2 (`Dinov2Model` and its image processor) from one directory; the [CLS] embedding."""

    def __init__(self, directory: Path, device: str = "cpu"):
        from transformers import AutoImageProcessor, Dinov2Model

        self.model = Dinov2Model.from_pretrained(directory).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(directory)
        self.device = device

    @torch.no_grad()
    def images(self, images: list[np.ndarray]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        return _unit(self.model(pixel_values=pixels).pooler_output)


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output from get_*_features; 4.x returns the tensor itself
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


@functools.lru_cache(maxsize=4)
def load_scorer(kind: str, directory: Path, device: str) -> ClipScorer | DinoScorer:
    """One scorer per (kind, weights, device) and process."""
    return {"clip": ClipScorer, "dino": DinoScorer}[kind](directory, device)


def remove_background(image: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image with pixels outside the (H, W) bool foreground set to white."""
    return np.where(foreground[..., None], image, np.uint8(255))


def clip_metrics(
    scorer: ClipScorer, image: np.ndarray, views: list[np.ndarray], prompt: str
) -> dict[str, float]:
    embeddings = scorer.images([image, *views])
    sims = embeddings[1:] @ embeddings[0]
    text = scorer.texts([prompt])[0]
    return {
        "clip_i_mean": float(sims.mean()),
        "clip_i_max": float(sims.max()),
        "clip_t": float(embeddings[0] @ text),
    }


def dino_metrics(scorer: DinoScorer, image: np.ndarray, views: list[np.ndarray]) -> dict[str, float]:
    embeddings = scorer.images([image, *views])
    sims = embeddings[1:] @ embeddings[0]
    return {"dino_mean": float(sims.mean()), "dino_max": float(sims.max())}
