"""`depth-pro` depth: transformers `DepthProForDepthEstimation` (apple/DepthPro-hf or a local dir).

Metric depth comes with the field of view predicted by the FOV head. Pre- and post-processing
follow `DepthProImageProcessor` (rescale + normalise, then bilinear resize to the model's input;
depth rescaled by the focal length, resized to the view, inverted) but run batched on the model's
device with one copy back per batch, instead of image by image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from refany3d.config import DepthSettings
from refany3d.models._device_lock import holds_device_lock
from refany3d.models._torch import torch_device_dtype
from refany3d.models.depth.base import DepthMap
from refany3d.models.sdpa import attention_kernels
from refany3d.models.weights import DEPTH_PRO, WeightsError, resolve_pretrained
from refany3d.records import Sample


def split_to_patches(pixel_values, patch_size: int, overlap_ratio: float):
    """transformers' Depth Pro `split_to_patches` without `F.unfold`: the same patches in the same
    order (windows row-major, then batch), cut as strided views and copied once. On an H100 the
    im2col kernel behind `F.unfold` took a third of Depth Pro's GPU time (bench/results/perception.md)."""
    _, channels, height, width = pixel_values.shape
    if height == width == patch_size:
        return pixel_values
    stride = int(patch_size * (1 - overlap_ratio))
    windows = pixel_values.unfold(2, patch_size, stride).unfold(3, patch_size, stride)  # B, C, nh, nw, p, p
    return windows.permute(2, 3, 0, 1, 4, 5).reshape(-1, channels, patch_size, patch_size)


# The transformers major versions whose `DepthProPatchEncoder.forward` `_patch_encoder_class`
# re-states; on others the model keeps the stock encoder (the same patches, cut by `F.unfold`).
_CHECKED_TRANSFORMERS = (5,)


def _patch_encoder_class():
    """transformers' `DepthProPatchEncoder` cutting its patches with `split_to_patches` above; the
    rest is the stock forward: three image scales → overlapping patches → the DINOv2 patch model →
    feature maps merged back per scale, plus the intermediate features of the finest scale."""
    import math

    import torch
    import torch.nn.functional as F
    from transformers.models.depth_pro.modeling_depth_pro import (
        DepthProPatchEncoder,
        reconstruct_feature_maps,
    )

    class _StridedPatchEncoder(DepthProPatchEncoder):
        def forward(self, pixel_values):
            batch, _, height, width = pixel_values.shape
            if min(self.scaled_images_ratios) * min(height, width) < self.config.patch_size:
                raise ValueError(
                    f"Image size {height}x{width} is too small to be scaled with scaled_images_ratios="
                    f"{self.scaled_images_ratios} when patch_size={self.config.patch_size}."
                )
            scales = zip(self.scaled_images_ratios, self.scaled_images_overlap_ratios, strict=True)
            patches = [
                split_to_patches(
                    F.interpolate(pixel_values, scale_factor=ratio, mode="bilinear", align_corners=False),
                    self.config.patch_size,
                    overlap,
                )
                for ratio, overlap in scales
            ]
            counts = [len(p) for p in patches]
            # the patch model takes the finest scale first
            encodings = self.model(
                torch.cat(patches[::-1], dim=0),
                output_hidden_states=self.n_intermediate_hooks > 0,
                return_dict=True,
            )
            last = torch.split_with_sizes(encodings.last_hidden_state, counts[::-1])[::-1]
            exponent = int(math.log2(width / self.out_size))
            base_height, base_width = height // 2**exponent, width // 2**exponent

            def merged(hidden, scale: int, ratio: float):
                size = (base_height * 2**scale, base_width * 2**scale)
                padding = int(self.merge_padding_value * (1 / ratio))
                return reconstruct_feature_maps(hidden, batch_size=batch, padding=padding, output_size=size)

            finest = self.n_scaled_images - 1
            return [
                *(merged(last[i], i, r) for i, r in enumerate(self.scaled_images_ratios)),
                *(
                    merged(encodings.hidden_states[hook + 1], finest, self.scaled_images_ratios[-1])
                    for hook in self.intermediate_hook_ids
                ),
            ]

    return _StridedPatchEncoder


def adapt_patch_encoder(model) -> int:
    """Give this `model`'s Depth Pro patch encoders `_patch_encoder_class` (this instance only, no
    library module changes); returns how many, 0 where the installed transformers is not one it
    was written against."""
    import transformers

    if int(transformers.__version__.split(".")[0]) not in _CHECKED_TRANSFORMERS:
        return 0
    cls = _patch_encoder_class()
    encoders = [m for m in model.modules() if type(m) is cls.__mro__[1]]
    for encoder in encoders:
        encoder.__class__ = cls
    return len(encoders)


class DepthProEstimator:
    name = "depth-pro"
    # compiled on CUDA with `depth.compile`, graphed with `depth.cuda_graphs`
    # (refany3d.models._torch.accelerate); the whole network: nothing in it waits for the device
    compile_layers = frozenset({"Dinov2Layer", "DepthProFeatureFusionLayer", "DepthProDepthEstimationHead"})
    graph_modules = frozenset({""})

    def __init__(self, weights: str, device: str = "cpu", dtype: str = "float32") -> None:
        import torch
        from transformers import DepthProForDepthEstimation, DepthProImageProcessor

        path = resolve_pretrained(weights, DEPTH_PRO)
        self.device, self.dtype = torch_device_dtype(device, dtype)
        processor = DepthProImageProcessor.from_pretrained(path)
        model = DepthProForDepthEstimation.from_pretrained(path, dtype=torch.float32)
        if not model.config.use_fov_model:
            raise WeightsError(
                f"depth.weights={weights!r}: the model has no FOV head, so no focal length; use apple/DepthPro-hf"
            )
        adapt_patch_encoder(model)  # same patches, no im2col
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        size = processor.size
        self.input_size = (int(size["height"]), int(size["width"]))
        scale = processor.rescale_factor if processor.do_rescale else 1.0
        mean = np.asarray(processor.image_mean if processor.do_normalize else [0.0] * 3, np.float32)
        std = np.asarray(processor.image_std if processor.do_normalize else [1.0] * 3, np.float32)
        # x ↦ (x·scale − mean) / std as one multiply-add per channel on uint8 pixels
        self._gain = torch.tensor(scale / std, device=self.device).view(1, 3, 1, 1)
        self._offset = torch.tensor(-mean / std, device=self.device).view(1, 3, 1, 1)

    def attention_kernels(self):
        """The SDPA kernel context of the DINOv2 encoders (each patch's tokens attend together)."""
        vit = self.model.config.patch_model_config
        tokens = (vit.image_size // vit.patch_size) ** 2 + 1
        head_dim = vit.hidden_size // vit.num_attention_heads
        return attention_kernels(head_dim, self.dtype, tokens, tokens, self.device)

    def _pixel_values(self, images: Sequence[Image.Image]):
        import torch
        import torch.nn.functional as F

        pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]))
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = x * self._gain + self._offset
        return F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False).to(self.dtype)

    @holds_device_lock
    def estimate(
        self, images: Sequence[Image.Image], samples: Sequence[Sample], options: DepthSettings, seed: int
    ) -> list[DepthMap]:
        import torch
        import torch.nn.functional as F

        sizes = {(im.height, im.width) for im in images}
        if len(sizes) != 1:  # views of one batch share a size; mixed sizes go one by one
            return [
                m
                for im, s in zip(images, samples, strict=True)
                for m in self.estimate([im], [s], options, seed)
            ]
        height, width = sizes.pop()
        with torch.inference_mode():
            with self.attention_kernels():  # also while compiled / graphed on the first call
                outputs = self.model(pixel_values=self._pixel_values(images))
            inverse = outputs.predicted_depth.float()[:, None]  # (B, 1, h, w) canonical inverse depth
            focal = 0.5 * width / torch.tan(0.5 * torch.deg2rad(outputs.field_of_view.float().reshape(-1)))
            inverse = inverse * (width / focal).view(-1, 1, 1, 1)
            inverse = F.interpolate(inverse, size=(height, width), mode="bilinear", align_corners=False)
            depth = (1.0 / inverse.clamp(1e-4, 1e4))[:, 0]
            depth, focal = depth.cpu().numpy(), focal.cpu().numpy()
        return [
            DepthMap(d.astype(np.float32, copy=False), float(f)) for d, f in zip(depth, focal, strict=True)
        ]
