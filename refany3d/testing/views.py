"""View samples for the perception tests and benches: drawn images (for the real backends) and the
synthetic source's rows after read_source + split_pair (for the `truth` backends)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from refany3d.config import BuildSettings, override
from refany3d.records import IMAGE, Sample
from refany3d.stages.context import StageContext
from refany3d.stages.read_source import plan_batches, read_source, resolve_files
from refany3d.stages.split_pair import split_pair
from refany3d.storage.store import ArtifactStore
from refany3d.synthetic import ensure_synthetic

ITEMS = ["red mug", "wooden chair", "toy car", "blue vase", "teapot", "lamp"]


def drawn_views(store: ArtifactStore, n: int, size: int = 96, seed: int = 0) -> list[Sample]:
    """`n` view samples of a coloured ellipse on a noisy background, images in `store`."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        x0, y0 = rng.integers(5, size // 3, 2)
        x1, y1 = rng.integers(size // 2, size - 5, 2)
        ImageDraw.Draw(image).ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(120, 255, 3)))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        uri = store.put_content("image", buf.getvalue(), ".png")
        sid = f"drawn-{i:03d}-left"
        out.append(
            Sample(
                sid,
                sid[:-5],
                "subjects200k",
                f"x.parquet#{i}",
                side="left",
                item=ITEMS[i % len(ITEMS)],
                artifacts={IMAGE: uri},
            )
        )
    return out


def synthetic_views(
    root: Path, rows: int = 2, size: int = 96
) -> tuple[list[Sample], StageContext, BuildSettings]:
    """View samples of the embedded synthetic source (after read_source + split_pair)."""
    pattern = ensure_synthetic(str(root / "src"), rows, 0, view_size=size)
    settings = override(BuildSettings(), **{"source.data_files": pattern})
    ctx = StageContext(store=ArtifactStore(str(root / "artifacts")), seed=0)
    batch = plan_batches(resolve_files(pattern), rows, source="synthetic")[0]
    views = split_pair(read_source(batch, settings, ctx).kept, settings, ctx).kept
    return views, ctx, settings


def perception_settings(**dotted: object) -> BuildSettings:
    """BuildSettings on CPU with the given dotted overrides."""
    return override(BuildSettings(), **dotted)


def run_batched(
    stage, samples: list[Sample], settings: BuildSettings, ctx: StageContext, section: str, size: int
):
    """Run `stage` with `<section>.batch_size = size`."""
    return stage(samples, override(settings, **{f"{section}.batch_size": size}), ctx)
