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
from refany3d.models._torch import holds_device_lock, torch_device_dtype
from refany3d.models.depth.base import DepthMap
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


class DepthProEstimator:
    name = "depth-pro"
    # compiled on CUDA with `depth.compile`, graphed with `depth.cuda_graphs`
    # (refany3d.models._torch.accelerate); the whole network: nothing in it waits for the device
    compile_layers = frozenset({"Dinov2Layer", "DepthProFeatureFusionLayer", "DepthProDepthEstimationHead"})
    graph_modules = frozenset({""})

    def __init__(self, weights: str, device: str = "cpu", dtype: str = "float32") -> None:
        import torch
        from transformers import DepthProForDepthEstimation, DepthProImageProcessor
        from transformers.models.depth_pro import modeling_depth_pro

        path = resolve_pretrained(weights, DEPTH_PRO)
        self.device, self.dtype = torch_device_dtype(device, dtype)
        processor = DepthProImageProcessor.from_pretrained(path)
        model = DepthProForDepthEstimation.from_pretrained(path, dtype=torch.float32)
        if not model.config.use_fov_model:
            raise WeightsError(
                f"depth.weights={weights!r}: the model has no FOV head, so no focal length; use apple/DepthPro-hf"
            )
        modeling_depth_pro.split_to_patches = split_to_patches  # same patches, no im2col
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        size = processor.size
        self.input_size = (int(size["height"]), int(size["width"]))
        scale = processor.rescale_factor if processor.do_rescale else 1.0
        mean = np.asarray(processor.image_mean if processor.do_normalize else [0.0] * 3, np.float32)
        std = np.asarray(processor.image_std if processor.do_normalize else [1.0] * 3, np.float32)
        # x ↦ (x·scale − mean) / std as one multiply-add per channel on uint8 pixels
        self._gain = torch.tensor(scale / std, device=self.device).view(1, 3, 1, 1)
        self._offset = torch.tensor(-mean / std, device=self.device).view(1, 3, 1, 1)

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
