"""Dense volume decoding with the query grid made on the latents' device.

hy3dgen's `VanillaVolumeDecoder` builds all (octree + 1)³ query points with `np.meshgrid` on the
CPU and copies them to the GPU: 57M points (685 MB) at octree 384, about a second of host work per
asset before the first decoder call. `DenseVolumeDecoder` computes each chunk's points from their
flat indices on the device instead: the same float32 axis values (`np.linspace`), the same `ij`
order and the same cast to the latents' dtype, so the decoder sees the same queries.

Every chunk has `num_chunks` queries (all of them if fewer): the last one is padded by repeating
the final point and its extra outputs are dropped, so a compiled decoder sees one shape only.
"""

from __future__ import annotations

import numpy as np


class DenseVolumeDecoder:
    """Drop-in for hy3dgen's `VanillaVolumeDecoder` (same call, same (B, n, n, n) float32 logits)."""

    def __call__(
        self,
        latents,
        geo_decoder,
        bounds: float | list[float] = 1.01,
        num_chunks: int = 10000,
        octree_resolution: int = 256,
        **kwargs,
    ):
        import torch

        box = [-bounds] * 3 + [bounds] * 3 if isinstance(bounds, float | int) else list(bounds)
        side = int(octree_resolution) + 1
        axes = [
            torch.from_numpy(np.linspace(box[i], box[i + 3], side, dtype=np.float32)).to(latents.device)
            for i in range(3)
        ]
        total, batch = side**3, latents.shape[0]
        num_chunks = min(int(num_chunks), total)  # a small grid is one chunk, not a padded one
        logits = None
        with torch.no_grad():
            for start in range(0, total, num_chunks):
                index = torch.arange(start, start + num_chunks, device=latents.device).clamp_max(total - 1)
                points = torch.stack(
                    [axes[0][index // side**2], axes[1][index // side % side], axes[2][index % side]], dim=-1
                )
                queries = points.to(latents.dtype)[None].repeat(batch, 1, 1)
                chunk = geo_decoder(queries=queries, latents=latents)[..., 0]  # (B, num_chunks)
                if logits is None:
                    logits = torch.empty(batch, total, dtype=chunk.dtype, device=chunk.device)
                kept = min(num_chunks, total - start)
                logits[:, start : start + kept] = chunk[:, :kept]
        return logits.view(batch, side, side, side).float()
