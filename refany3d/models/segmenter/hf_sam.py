"""`hf-sam` segmenter: transformers `SamModel` + `SamProcessor` with a box prompt (local dir or cached hub id)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from refany3d.config import SegmenterSettings
from refany3d.models._device_lock import holds_device_lock
from refany3d.models._torch import torch_device_dtype
from refany3d.models.segmenter.base import Segmentation
from refany3d.models.weights import HF_SAM, resolve_pretrained
from refany3d.records import Sample


class HfSamSegmenter:
    name = "hf-sam"

    def __init__(
        self, weights: str, device: str = "cpu", dtype: str = "float32", model_type: str = ""
    ) -> None:
        import torch
        from transformers import SamModel, SamProcessor

        del model_type  # the directory's config.json says which encoder it is
        path = resolve_pretrained(weights, HF_SAM)
        self.device, self.dtype = torch_device_dtype(device, dtype)
        self.processor = SamProcessor.from_pretrained(path)
        model = SamModel.from_pretrained(path, dtype=torch.float32)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()

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

        inputs = self.processor(
            images=list(images),
            input_boxes=[[[float(v) for v in box]] for box in boxes],
            return_tensors="pt",
            device=self.device,
        ).to(self.device)
        with torch.inference_mode():
            outputs = self.model(
                pixel_values=inputs["pixel_values"].to(self.dtype),
                input_boxes=inputs["input_boxes"].to(self.dtype),
                multimask_output=False,
            )
        masks = self.processor.post_process_masks(
            outputs.pred_masks.float(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )
        scores = outputs.iou_scores.float().cpu()
        return [
            Segmentation(m[0, 0].cpu().numpy().astype(bool), float(scores[i, 0, 0]))
            for i, m in enumerate(masks)
        ]
