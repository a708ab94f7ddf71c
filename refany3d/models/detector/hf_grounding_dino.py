"""`hf-grounding-dino` detector: transformers `GroundingDinoForObjectDetection` (local dir or cached hub id)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from refany3d.config import DetectorSettings
from refany3d.models._device_lock import holds_device_lock
from refany3d.models._torch import torch_device_dtype
from refany3d.models.detector.base import Detection
from refany3d.models.sdpa import attention_kernels
from refany3d.models.weights import HF_GROUNDING_DINO, resolve_pretrained
from refany3d.records import Sample

# The transformers major versions whose Grounding DINO deformable attention the subclasses below
# were written against (the stock forward they re-state, its tensor layouts). On others the model
# keeps its stock modules: the same results, without the speed-ups.
_CHECKED_TRANSFORMERS = (5,)


def _summed_deformable_attention_class():
    """transformers' `MultiScaleDeformableAttention` (its PyTorch path) with the levels' weighted
    samples summed level by level instead of stacked first: the same sum without the stacked copy.
    On an H100 at batch 8 that stack's concatenation and the sum over it were ~28 % of the
    detector's GPU time (bench/results/perception.md)."""
    import torch.nn.functional as F
    from transformers.models.grounding_dino.modeling_grounding_dino import MultiScaleDeformableAttention

    class _SummedDeformableAttention(MultiScaleDeformableAttention):
        def forward(
            self,
            value,
            value_spatial_shapes,
            value_spatial_shapes_list,
            level_start_index,
            sampling_locations,
            attention_weights,
            im2col_step,
        ):
            batch, _, heads, dim = value.shape
            _, queries, _, levels, points, _ = sampling_locations.shape
            # the split fails unless the levels' sizes add up to the sequence: the host-side form of
            # the check `_HostCheckedDeformableAttention` leaves out
            values = value.split([h * w for h, w in value_spatial_shapes_list], dim=1)
            # (B, Q, heads, levels, points, 2) → (B·heads, Q, levels, points, 2), grids in [-1, 1]
            grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)
            weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels, points)
            output = None
            for level, (height, width) in enumerate(value_spatial_shapes_list):
                v = values[level].flatten(2).transpose(1, 2).reshape(batch * heads, dim, height, width)
                sampled = F.grid_sample(
                    v, grids[:, :, level], mode="bilinear", padding_mode="zeros", align_corners=False
                )  # (B·heads, dim, Q, points)
                term = (sampled * weights[..., level, :]).sum(-1)
                output = term if output is None else output + term
            return output.view(batch, heads * dim, queries).transpose(1, 2).contiguous()

    return _SummedDeformableAttention


def _host_checked_deformable_attention_class():
    """transformers' `GroundingDinoMultiscaleDeformableAttention` without its
    `torch_compilable_check` that the spatial shapes add up to the encoder's sequence length: that
    condition is a device tensor, read back with a device synchronisation, and the read keeps the
    encoder and decoder out of CUDA graphs. Its core, `_SummedDeformableAttention`, makes the same
    check on the host. The rest is the stock forward."""
    import torch
    import torch.nn.functional as F
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        GroundingDinoMultiscaleDeformableAttention,
    )

    class _HostCheckedDeformableAttention(GroundingDinoMultiscaleDeformableAttention):
        def forward(
            self,
            hidden_states,
            attention_mask=None,
            encoder_hidden_states=None,
            encoder_attention_mask=None,
            position_embeddings=None,
            reference_points=None,
            spatial_shapes=None,
            spatial_shapes_list=None,
            level_start_index=None,
            output_attentions=False,
        ):
            if position_embeddings is not None:
                hidden_states = hidden_states + position_embeddings
            batch, queries, _ = hidden_states.shape
            _, length, _ = encoder_hidden_states.shape
            heads, levels, points = self.n_heads, self.n_levels, self.n_points
            value = self.value_proj(encoder_hidden_states)
            if attention_mask is not None:
                value = value.masked_fill(~attention_mask[..., None], float(0))
            value = value.view(batch, length, heads, self.d_model // heads)
            offsets = self.sampling_offsets(hidden_states).view(batch, queries, heads, levels, points, 2)
            weights = self.attention_weights(hidden_states).view(batch, queries, heads, levels * points)
            weights = F.softmax(weights, -1).view(batch, queries, heads, levels, points)
            if reference_points.shape[-1] == 2:
                normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
                locations = (
                    reference_points[:, :, None, :, None, :]
                    + offsets / normalizer[None, None, None, :, None, :]
                )
            elif reference_points.shape[-1] == 4:
                boxes = reference_points[:, :, None, :, None]
                locations = boxes[..., :2] + offsets / points * boxes[..., 2:] * 0.5
            else:
                raise ValueError(
                    f"Last dim of reference_points must be 2 or 4, but got {reference_points.shape[-1]}"
                )
            output = self.attn(
                value,
                spatial_shapes,
                spatial_shapes_list,
                level_start_index,
                locations,
                weights,
                self.im2col_step,
            )
            return self.output_proj(output), weights

    return _HostCheckedDeformableAttention


def adapt_deformable_attention(model) -> int:
    """Give this `model`'s deformable attention layers (and their cores) the subclasses above, on
    this instance only (no library module changes); returns how many layers, 0 where the
    installed transformers is not one they were written against."""
    import transformers

    if int(transformers.__version__.split(".")[0]) not in _CHECKED_TRANSFORMERS:
        return 0
    layer_cls, core_cls = _host_checked_deformable_attention_class(), _summed_deformable_attention_class()
    layers = [m for m in model.modules() if type(m) is layer_cls.__mro__[1]]
    for layer in layers:
        layer.__class__ = layer_cls
        layer.attn.__class__ = core_cls
    return len(layers)


class HfGroundingDinoDetector:
    name = "hf-grounding-dino"
    # compiled on CUDA with `detector.compile`, graphed with `detector.cuda_graphs`
    # (refany3d.models._torch.accelerate); the glue between the graphed regions creates device
    # constants from host lists (spatial shapes, text length), which a graph cannot capture
    compile_layers = frozenset(
        {"SwinLayer", "BertLayer", "GroundingDinoEncoderLayer", "GroundingDinoDecoderLayer"}
    )
    graph_modules = frozenset({"model.text_backbone", "model.backbone", "model.encoder", "model.decoder"})
    # Prompts are padded to a multiple of this many tokens: padded tokens are masked everywhere, and
    # few distinct text lengths mean few CUDA graphs (one per input shape).
    text_pad_multiple = 16

    def __init__(self, weights: str, device: str = "cpu", dtype: str = "float32") -> None:
        import torch
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        path = resolve_pretrained(weights, HF_GROUNDING_DINO)
        self.device, self.dtype = torch_device_dtype(device, dtype)
        self.processor = AutoProcessor.from_pretrained(path)
        # Built on the CPU, then moved: the model creates `level_embed` on the CPU whatever the device context.
        model = GroundingDinoForObjectDetection.from_pretrained(path, dtype=torch.float32)
        adapt_deformable_attention(model)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()

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

        inputs = self.processor(
            images=list(images),
            text=list(prompts),
            return_tensors="pt",
            padding=True,
            pad_to_multiple_of=self.text_pad_multiple,
            device=self.device,
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        text = self.model.config.text_config  # BERT: the part of GroundingDINO that runs SDPA
        tokens = inputs["input_ids"].shape[1]
        kernels = attention_kernels(
            text.hidden_size // text.num_attention_heads, self.dtype, tokens, tokens, self.device
        )
        with torch.inference_mode(), kernels:
            outputs = self.model(**inputs)
        # Only the best `max_boxes` queries (of 900) can be kept by the detect stage: post-process
        # those, on the host after one copy per batch.
        logits = outputs.logits.float()
        top = (
            logits.sigmoid().amax(-1).topk(min(options.max_boxes, logits.shape[1]), dim=1).indices[..., None]
        )
        probs = logits.gather(1, top.expand(-1, -1, logits.shape[-1])).sigmoid().cpu().numpy()
        cxcywh = outputs.pred_boxes.float().gather(1, top.expand(-1, -1, 4)).cpu().numpy()
        input_ids = inputs["input_ids"].cpu().numpy()
        return [
            self._detection(p, b, ids, im.size, options)
            for p, b, ids, im in zip(probs, cxcywh, input_ids, images, strict=True)
        ]

    def _detection(
        self,
        probs: np.ndarray,
        cxcywh: np.ndarray,
        input_ids: np.ndarray,
        size: tuple[int, int],
        options: DetectorSettings,
    ) -> Detection:
        """transformers' `post_process_grounded_object_detection` for one image, in numpy: boxes
        whose best token probability exceeds `box_threshold`, in view pixels (x0, y0, x1, y1), and as
        phrase the prompt tokens above `text_threshold` (first and last text positions excluded)."""
        scores = probs.max(-1)
        keep = scores > options.box_threshold
        cx, cy, w, h = cxcywh[keep].T
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * np.tile(size, 2)
        tokens = probs[keep] > options.text_threshold
        tokens[:, 0] = tokens[:, -1] = False
        phrases = self.processor.batch_decode(
            [input_ids[np.flatnonzero(t[: len(input_ids)])].tolist() for t in tokens]
        )
        return Detection(
            boxes.astype(np.float32).reshape(-1, 4),
            scores[keep].astype(np.float32),
            [str(t) for t in phrases],
        )
