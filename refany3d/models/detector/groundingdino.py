"""`groundingdino` detector: the groundingdino-py 0.4 package (config .py + checkpoint + local BERT dir).

groundingdino-py 0.4 wraps BERT in `BertModelWarper`, which takes methods from the BERT model that
transformers 5 removed (`get_extended_attention_mask`, `invert_attention_mask`, `get_head_mask`).
Where they are missing, our model's BERT is wrapped by `_BertCompat` instead, which keeps the same
sub-module names (checkpoint keys `bert.embeddings...` still load) and feeds the per-phrase
self-attention mask to the BERT encoder directly (`build_groundingdino`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from refany3d.config import DetectorSettings
from refany3d.models._device_lock import holds_device_lock
from refany3d.models._torch import torch_device_dtype
from refany3d.models.detector.base import Detection
from refany3d.models.weights import (
    BERT,
    GROUNDINGDINO_CKPT_HOW,
    WeightsError,
    require_file,
    resolve_pretrained,
)
from refany3d.records import Sample

_LONG_OVER_SHORT = 1333 / 800  # groundingdino-py's inference resize: short side 800, long side <= 1333
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _import_groundingdino():
    try:
        import groundingdino.models.GroundingDINO.groundingdino as gd_module
        from groundingdino.models import build_model
        from groundingdino.util.misc import clean_state_dict, nested_tensor_from_tensor_list
        from groundingdino.util.slconfig import SLConfig
        from groundingdino.util.utils import get_phrases_from_posmap
    except ImportError as err:
        raise ImportError(
            "detector.backend=groundingdino needs groundingdino-py 0.4: `pip install --no-deps groundingdino-py==0.4.0 "
            f"addict yapf matplotlib pycocotools` (pure Python, no compile); import failed: {err}"
        ) from err
    return (
        gd_module,
        build_model,
        clean_state_dict,
        nested_tensor_from_tensor_list,
        SLConfig,
        get_phrases_from_posmap,
    )


def _bert_compat_class():
    import torch
    from torch import nn
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    class _BertCompat(nn.Module):
        """groundingdino's BertModelWarper for transformers 5: same sub-modules, 3-D mask support."""

        def __init__(self, bert_model: nn.Module) -> None:
            super().__init__()
            self.config = bert_model.config
            self.embeddings = bert_model.embeddings
            self.encoder = bert_model.encoder
            self.pooler = bert_model.pooler

        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, **_):
            hidden = self.embeddings(
                input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids
            )
            if attention_mask.dim() == 2:
                attention_mask = attention_mask[:, None, :].expand(-1, attention_mask.shape[1], -1)
            # additive (B, 1, T, T) mask: transformers passes 4-D masks through unchanged
            additive = (1.0 - attention_mask[:, None].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
            out = self.encoder(hidden, attention_mask=additive, position_ids=position_ids)
            return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=out.last_hidden_state)

    return _BertCompat


# What groundingdino-py's BertModelWarper takes from the BERT model it wraps.
_WARPER_NEEDS = ("get_extended_attention_mask", "invert_attention_mask", "get_head_mask")
_BUILD_LOCK = threading.Lock()


def _stock_warper_works() -> bool:
    from transformers import BertModel

    return all(hasattr(BertModel, name) for name in _WARPER_NEEDS)


@contextlib.contextmanager
def _warper_for_this_build(gd_module) -> Iterator[None]:
    """`GroundingDINO.__init__` wraps its BERT in the module's `BertModelWarper` by name, with no
    way to pass another class: for the length of one constructor call (under a lock, restored
    after) that name is `_BertCompat`, so only the model built here gets it."""
    with _BUILD_LOCK:
        stock = gd_module.BertModelWarper
        gd_module.BertModelWarper = _bert_compat_class()
        try:
            yield
        finally:
            gd_module.BertModelWarper = stock


def build_groundingdino(args):
    """groundingdino-py's `build_model(args)`; on a transformers without what its BERT wrapper
    needs (5 and later), the model's BERT is wrapped by `_BertCompat` instead."""
    gd_module, build_model, *_ = _import_groundingdino()
    if _stock_warper_works():
        return build_model(args)
    with _warper_for_this_build(gd_module):
        return build_model(args)


class GroundingDinoDetector:
    name = "groundingdino"

    def __init__(
        self,
        weights: str,
        device: str = "cpu",
        dtype: str = "float32",
        text_encoder: str = "",
        config: str = "",
    ) -> None:
        import torch

        gd_module, _, clean_state_dict, self._nest, SLConfig, self._phrases = _import_groundingdino()
        ckpt_path = require_file(
            weights, "detector.weights", "a groundingdino-py checkpoint (.pth)", GROUNDINGDINO_CKPT_HOW
        )
        bert_dir = resolve_pretrained(text_encoder, BERT)
        config_path = (
            Path(config)
            if config
            else Path(gd_module.__file__).parents[2] / "config" / "GroundingDINO_SwinT_OGC.py"
        )
        self.device, self.dtype = torch_device_dtype(device, dtype)
        args = SLConfig.fromfile(str(config_path))
        args.text_encoder_type = str(bert_dir)
        args.device = str(self.device)
        model = build_groundingdino(args)
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        missing, _unexpected = model.load_state_dict(
            clean_state_dict(state.get("model", state)), strict=False
        )
        if missing:
            raise WeightsError(
                f"detector.weights={weights!r}: checkpoint does not match {config_path.name} "
                f"({len(missing)} missing tensors, e.g. {missing[0]}); {GROUNDINGDINO_CKPT_HOW}"
            )
        self.model = model.to(self.device).eval()

    def _pixels(self, images: Sequence[Image.Image], short_side: int) -> list:
        import torch
        import torch.nn.functional as F

        out = []
        mean = torch.tensor(_MEAN, device=self.device)[:, None, None]
        std = torch.tensor(_STD, device=self.device)[:, None, None]
        for im in images:
            x = torch.from_numpy(np.array(im.convert("RGB"))).to(self.device).permute(2, 0, 1).float() / 255.0
            h, w = x.shape[1:]
            scale = min(short_side / min(h, w), short_side * _LONG_OVER_SHORT / max(h, w))
            size = (round(h * scale), round(w * scale))
            x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
            out.append((x - mean) / std)
        return out

    @holds_device_lock
    def detect(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        samples: Sequence[Sample],
        options: DetectorSettings,
        seed: int,
    ) -> list[Detection]:
        import torch

        batch = self._nest(self._pixels(images, options.image_size))
        half = self.dtype != torch.float32
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=half):
            outputs = self.model(batch, captions=list(prompts))
        probs = outputs["pred_logits"].float().sigmoid()  # (B, queries, 256 text tokens)
        cxcywh = outputs["pred_boxes"].float()
        results = []
        for i, (im, prompt) in enumerate(zip(images, prompts, strict=True)):
            scores = probs[i].max(dim=1).values
            best = scores.topk(min(options.max_boxes, scores.numel())).indices  # phrase decoding is per box
            keep = torch.zeros_like(scores, dtype=torch.bool)
            keep[best] = scores[best] > options.box_threshold
            cx, cy, bw, bh = cxcywh[i][keep].unbind(-1)
            scale = torch.tensor([im.width, im.height, im.width, im.height], device=cxcywh.device)
            boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1) * scale
            tokenized = self.model.tokenizer(prompt)
            phrases = [
                self._phrases(p > options.text_threshold, tokenized, self.model.tokenizer)
                .replace(".", "")
                .strip()
                for p in probs[i][keep].cpu()
            ]
            results.append(
                Detection(
                    boxes.cpu().numpy().astype(np.float32).reshape(-1, 4),
                    scores[keep].cpu().numpy().astype(np.float32),
                    phrases,
                )
            )
        return results
