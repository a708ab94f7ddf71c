"""`sam` segmenter: segment-anything 1.0 with a box prompt, a batch of views per forward pass.

The image-encoder shape (width, depth, heads, global-attention blocks, input side) is read from
the checkpoint, so vit_h / vit_l / vit_b checkpoints (and small test encoders) load through the same
path; a checkpoint that is a known size other than `segmenter.model_type` is an error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

from refany3d.config import SegmenterSettings
from refany3d.models._device_lock import holds_device_lock
from refany3d.models._torch import torch_device_dtype
from refany3d.models.segmenter.base import Segmentation
from refany3d.models.weights import SAM_CKPT_HOW, WeightsError, require_file
from refany3d.records import Sample

# (embed_dim, depth) of the released encoders
_KNOWN = {(1280, 32): "vit_h", (1024, 24): "vit_l", (768, 12): "vit_b"}


def build_sam(
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: list[int],
    image_size: int = 1024,
):
    """segment-anything's `Sam` as its `_build_sam` makes it, with the input side as a parameter
    (the released models use 1024; small test models use less)."""
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    patch, prompt_dim = 16, 256
    encoder = ImageEncoderViT(
        depth=encoder_depth,
        embed_dim=encoder_embed_dim,
        img_size=image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=encoder_num_heads,
        patch_size=patch,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=encoder_global_attn_indexes,
        window_size=14,
        out_chans=prompt_dim,
    )
    prompt = PromptEncoder(
        embed_dim=prompt_dim,
        image_embedding_size=(image_size // patch, image_size // patch),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=2048, num_heads=8),
        transformer_dim=prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return Sam(
        image_encoder=encoder,
        prompt_encoder=prompt,
        mask_decoder=decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def _sdpa_attention_class():
    """segment-anything's encoder attention computed by `scaled_dot_product_attention`.

    Same maths (the decomposed relative-position term becomes the additive mask), but a fused
    kernel instead of materialising softmax(QKᵀ) in eager ops: the ViT-H encoder is most of SAM's time.
    """
    import torch
    import torch.nn.functional as F
    from segment_anything.modeling.image_encoder import Attention, get_rel_pos

    class _SdpaAttention(Attention):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, h, w, _ = x.shape
            qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # (B, heads, HW, head_dim)
            bias = None
            if self.use_rel_pos:
                r_q = q.reshape(b * self.num_heads, h, w, -1)
                rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, self.rel_pos_h))
                rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, self.rel_pos_w))
                bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(
                    b, self.num_heads, h * w, h * w
                )
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
            return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))

    return _SdpaAttention


def _augmented_attention_class():
    """Encoder attention with the relative-position term folded into Q and K, so SDPA can use its
    flash kernel (no additive mask): q' = [q·scale, rel_h, rel_w], k' = [k, onehot(row), onehot(col)]
    gives q'·k' = scale·q·k + rel_h[row(k)] + rel_w[col(k)]. V is zero-padded to the same width."""
    import torch
    import torch.nn.functional as F
    from segment_anything.modeling.image_encoder import Attention, get_rel_pos

    class _AugmentedAttention(Attention):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, h, w, _ = x.shape
            qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # (B, heads, HW, head_dim)
            head_dim = q.shape[-1]
            r_q = q.reshape(b, self.num_heads, h, w, head_dim)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, self.rel_pos_h).to(q.dtype))
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, self.rel_pos_w).to(q.dtype))
            extra = h + w
            width = -(-(head_dim + extra) // 8) * 8
            pad = width - head_dim - extra
            q2 = torch.cat(
                [
                    q * self.scale,
                    rel_h.reshape(b, self.num_heads, h * w, h),
                    rel_w.reshape(b, self.num_heads, h * w, w),
                    q.new_zeros(b, self.num_heads, h * w, pad),
                ],
                -1,
            )
            rows = torch.arange(h * w, device=x.device) // w
            cols = torch.arange(h * w, device=x.device) % w
            onehot = torch.cat([F.one_hot(rows, h), F.one_hot(cols, w), rows.new_zeros(h * w, pad)], -1).to(
                k.dtype
            )
            k2 = torch.cat([k, onehot.expand(b, self.num_heads, -1, -1)], -1)
            v2 = F.pad(v, (0, width - head_dim))
            out = F.scaled_dot_product_attention(q2, k2, v2, scale=1.0)[..., :head_dim]
            return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))

    return _AugmentedAttention


def _use_fast_attention(model) -> None:
    """Swap every encoder block's attention for the Q/K-augmented SDPA version (same parameters,
    same outputs). ViT-H encoder on an H100, fp16, batch 8 (bench/results/perception.json):
    segment-anything's eager attention 44.4 ms/image, SDPA with an additive mask 38.8, augmented 32.2."""
    cls = _augmented_attention_class()
    for block in model.image_encoder.blocks:
        block.attn.__class__ = cls


def _encoder_shape(state: dict) -> dict:
    """_build_sam keyword arguments of the image encoder stored in a SAM state dict."""
    embed_dim = state["image_encoder.patch_embed.proj.weight"].shape[0]
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    rel = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in blocks]
    window_len = min(r.shape[0] for r in rel)
    return {
        "encoder_embed_dim": embed_dim,
        "encoder_depth": len(blocks),
        "encoder_num_heads": embed_dim // rel[0].shape[1],
        # windowed blocks have 2·14−1 relative positions, global ones 2·64−1
        "encoder_global_attn_indexes": [
            i for i, r in zip(blocks, rel, strict=True) if r.shape[0] > window_len
        ],
        "image_size": state["image_encoder.pos_embed"].shape[1] * 16,
    }


class SamSegmenter:
    name = "sam"
    # compiled on CUDA with `segmenter.compile`, graphed with `segmenter.cuda_graphs`
    # (refany3d.models._torch.accelerate)
    compile_layers = frozenset({"Block"})  # the image-encoder blocks (ViT-H: 32 of its 33 ms)
    graph_modules = frozenset({"image_encoder"})

    def __init__(
        self, weights: str, device: str = "cpu", dtype: str = "float32", model_type: str = "vit_h"
    ) -> None:
        import torch

        try:
            from segment_anything.utils.transforms import ResizeLongestSide
        except ImportError as err:
            raise ImportError("segmenter.backend=sam needs `pip install segment-anything`") from err

        path = require_file(
            weights, "segmenter.weights", f"a segment-anything {model_type} checkpoint (.pth)", SAM_CKPT_HOW
        )
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            shape = _encoder_shape(state)
        except (KeyError, IndexError) as err:
            raise WeightsError(
                f"segmenter.weights={weights!r}: not a SAM state dict ({err}); {SAM_CKPT_HOW}"
            ) from None
        found = _KNOWN.get((shape["encoder_embed_dim"], shape["encoder_depth"]))
        if found is not None and found != model_type:
            raise WeightsError(
                f"segmenter.weights={weights!r} is a {found} checkpoint but segmenter.model_type={model_type}"
            )
        self.device, self.dtype = torch_device_dtype(device, dtype)
        model = build_sam(**shape)
        model.load_state_dict(state)
        _use_fast_attention(model)
        # fp32 weights under autocast: the prompt encoder casts its inputs to float32 itself,
        # so a model converted with .half() fails on its first matmul
        self.model = model.to(device=self.device).eval()
        self.resize = ResizeLongestSide(model.image_encoder.img_size)

    @holds_device_lock
    def segment(
        self,
        images: Sequence[Image.Image],
        boxes: Sequence[Sequence[float]],
        samples: Sequence[Sample],
        options: SegmenterSettings,
        seed: int,
    ) -> list[Segmentation]:
        import torch

        sizes = {(im.height, im.width) for im in images}
        if len(sizes) != 1:  # views of one batch share a size; mixed sizes go one by one
            return [
                seg
                for im, box, s in zip(images, boxes, samples, strict=True)
                for seg in self.segment([im], [box], [s], options, seed)
            ]
        size = sizes.pop()
        # one host-to-device copy for the batch; resized view by view, so a view's input does not
        # depend on its batch (a batched antialiased resize differs in the last bits)
        pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]))
        pixels = pixels.to(self.device).permute(0, 3, 1, 2).float()
        resized = [self.resize.apply_image_torch(pixels[i : i + 1])[0] for i in range(len(images))]
        prompts = self.resize.apply_boxes_torch(
            torch.tensor(np.asarray(boxes, np.float32), device=self.device), size
        )
        batch = [
            {"image": image, "original_size": size, "boxes": box[None]}
            for image, box in zip(resized, prompts, strict=True)
        ]
        half = self.dtype != torch.float32
        # no autocast cache: a CUDA graph captured inside this block would read cast weights from
        # the cache, which is freed when the block ends
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=half, cache_enabled=False)
        with torch.inference_mode(), autocast:
            outputs = self.model(batch, multimask_output=False)
        masks = torch.stack([o["masks"][0, 0] for o in outputs]).cpu().numpy().astype(bool)
        scores = torch.stack([o["iou_predictions"][0, 0] for o in outputs]).float().cpu().numpy()
        return [Segmentation(m, float(s)) for m, s in zip(masks, scores, strict=True)]
