"""Split stage: one Subjects200K row (two views of a subject side by side) → two view samples.

The pair image is `W × H` with two `S × S` views and padding `p` around and between them:
`W = 2S + 3p`, `H = S + 2p`, hence `p = 2H − W` and `S = H − 2p`. Padding differs between
collections and releases, so it is derived per image, never assumed.
"""

from __future__ import annotations

import io
from collections import defaultdict

from PIL import Image, UnidentifiedImageError

from refany3d.config import BuildSettings
from refany3d.records import IMAGE, Sample, StageResult
from refany3d.stages.context import StageContext
from refany3d.stages.read_source import iter_rows

STAGE = "split"
IMAGE_UNDECODABLE = "image_undecodable"
MISSING_IMAGE = "missing_image"
BAD_LAYOUT = "bad_layout"
VIEW_TOO_SMALL = "view_too_small"
EMPTY_CAPTION = "empty_caption"

SIDES = (("left", "description_0"), ("right", "description_1"))


def pair_layout(width: int, height: int) -> tuple[int, int]:
    """(padding p, view side S) of a padded side-by-side pair; ValueError if inconsistent."""
    pad = 2 * height - width
    side = height - 2 * pad
    if pad < 0 or side <= 0 or 2 * side + 3 * pad != width or side + 2 * pad != height:
        raise ValueError(f"{width}x{height} is not a padded pair of two square views")
    return pad, side


def view_boxes(pad: int, side: int) -> dict[str, tuple[int, int, int, int]]:
    """PIL crop boxes (left, top, right, bottom) of the two views."""
    return {
        "left": (pad, pad, pad + side, pad + side),
        "right": (2 * pad + side, pad, 2 * pad + 2 * side, pad + side),
    }


def _image_bytes(cell: object) -> bytes | None:
    if isinstance(cell, dict):
        return cell.get("bytes")
    return cell if isinstance(cell, bytes) else None


def _read_images(samples: list[Sample]) -> dict[str, bytes | None]:
    """Image bytes by source_ref, reading each file once over the rows needed."""
    by_file: dict[str, list[int]] = defaultdict(list)
    for s in samples:
        url, _, row = s.source_ref.rpartition("#")
        by_file[url].append(int(row))
    images: dict[str, bytes | None] = {}
    for url, rows in by_file.items():
        wanted = set(rows)
        for index, row in iter_rows(url, min(rows), max(rows) + 1, ["image"]):
            if index in wanted:
                images[f"{url}#{index}"] = _image_bytes(row.get("image"))
    return images


def _encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def split_pair(samples: list[Sample], settings: BuildSettings, ctx: StageContext) -> StageResult:
    result = StageResult()
    images = _read_images(samples)
    for row in samples:
        data = images.get(row.source_ref)
        if not data:
            result.drop(row, STAGE, MISSING_IMAGE)
            continue
        try:
            pair = Image.open(io.BytesIO(data))
            pair.load()
        except (UnidentifiedImageError, OSError, ValueError) as err:
            result.drop(row, STAGE, IMAGE_UNDECODABLE, detail=str(err)[:200])
            continue
        try:
            pad, side = pair_layout(*pair.size)
        except ValueError as err:
            result.drop(row, STAGE, BAD_LAYOUT, detail=str(err))
            continue
        if side < settings.split.min_view_size:
            result.drop(row, STAGE, VIEW_TOO_SMALL, metric=float(side))
            continue
        boxes = view_boxes(pad, side)
        for side_name, key in SIDES:
            view = row.replace(sample_id=f"{row.source_id}-{side_name}", side=side_name)
            view.caption = str(row.description.get(key) or "").strip()
            if not view.caption:
                result.drop(view, STAGE, EMPTY_CAPTION)
                continue
            crop = pair.crop(boxes[side_name]).convert("RGB")
            view.artifacts[IMAGE] = ctx.store.put_content("image", _encode_png(crop), ".png")
            view.metrics["view_size"] = float(side)
            view.metrics["pair_padding"] = float(pad)
            result.kept.append(view)
    return result
