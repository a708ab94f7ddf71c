"""`depth-pro` depth: transformers `DepthProForDepthEstimation` (apple/DepthPro-hf or a local dir).

Metric depth comes with the field of view predicted by the FOV head; with `target_sizes` the
post-processing rescales depth to the view's pixels and returns the focal length in those pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from refany3d.config import DepthSettings
from refany3d.models._torch import torch_device_dtype
from refany3d.models.depth.base import DepthMap
from refany3d.models.weights import DEPTH_PRO, WeightsError, resolve_pretrained
from refany3d.records import Sample


class DepthProEstimator:
    name = "depth-pro"
    # compiled on CUDA with `depth.compile` (refany3d.models._torch.maybe_compile)
    compile_layers = frozenset({"Dinov2Layer", "DepthProFeatureFusionLayer", "DepthProDepthEstimationHead"})

    def __init__(self, weights: str, device: str = "cpu", dtype: str = "float32") -> None:
        import torch
        from transformers import DepthProForDepthEstimation, DepthProImageProcessor

        path = resolve_pretrained(weights, DEPTH_PRO)
        self.device, self.dtype = torch_device_dtype(device, dtype)
        self.processor = DepthProImageProcessor.from_pretrained(path)
        model = DepthProForDepthEstimation.from_pretrained(path, dtype=torch.float32)
        if not model.config.use_fov_model:
            raise WeightsError(
                f"depth.weights={weights!r}: the model has no FOV head, so no focal length; use apple/DepthPro-hf"
            )
        self.model = model.to(device=self.device, dtype=self.dtype).eval()

    def estimate(
        self, images: Sequence[Image.Image], samples: Sequence[Sample], options: DepthSettings, seed: int
    ) -> list[DepthMap]:
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt", device=self.device).to(self.device)
        with torch.inference_mode():
            outputs = self.model(pixel_values=inputs["pixel_values"].to(self.dtype))
        outputs.predicted_depth = outputs.predicted_depth.float()
        outputs.field_of_view = outputs.field_of_view.float()
        results = self.processor.post_process_depth_estimation(
            outputs, target_sizes=[(im.height, im.width) for im in images]
        )
        return [
            DepthMap(r["predicted_depth"].cpu().numpy().astype(np.float32), float(r["focal_length"]))
            for r in results
        ]
