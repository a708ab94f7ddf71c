"""Split stage: one Subjects200K row (two views of a subject side by side) → two view samples.

The pair image is `W × H` with two `S × S` views and padding `p` around and between them:
`W = 2S + 3p`, `H = S + 2p`, hence `p = 2H − W` and `S = H − 2p`. Padding differs between
collections and releases, so it is derived per image, never assumed.
"""

from __future__ import annotations

import io
import struct
from collections import defaultdict

from PIL import Image, ImageFile, UnidentifiedImageError

from refany3d.config import BuildSettings
from refany3d.records import IMAGE, Sample, StageResult, error_detail
from refany3d.stages.context import StageContext
from refany3d.stages.read_source import iter_rows

STAGE = "split"
IMAGE_UNDECODABLE = "image_undecodable"
IMAGE_TOO_LARGE = "image_too_large"
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


def _open_header(data: bytes) -> ImageFile.ImageFile:
    """The image in `data`, identified and sized from its header; no pixel is decoded yet.

    This is `PIL.Image.open`'s loop over the registered formats without its decompression-bomb
    check, which warns through the process-wide `warnings` machinery (not catchable per thread
    while other stages run beside this one) or raises: the caller checks the size itself first.
    """
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        if accept is not None and accept(prefix) is not True:
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # like Image.open: not this format after all
    raise UnidentifiedImageError("cannot identify image file")


def _decoded_pair(
    data: bytes, settings: BuildSettings
) -> tuple[Image.Image, int, int] | tuple[str, float | None, str]:
    """(pair image, padding p, view side S), or (reason, metric, detail) of why the row is dropped.

    The layout and size checks read the header only, so an oversized image (a decompression bomb:
    a small file that decodes to gigabytes) is rejected before any pixel is decoded.
    """
    try:
        pair = _open_header(data)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        return IMAGE_UNDECODABLE, None, error_detail(err)
    width, height = pair.size
    try:
        pad, side = pair_layout(width, height)
    except ValueError as err:
        return BAD_LAYOUT, None, str(err)
    limit = Image.MAX_IMAGE_PIXELS  # PIL's own bound, kept even when max_view_size is set above it
    if side > settings.split.max_view_size or (limit is not None and width * height > limit):
        detail = (
            f"{width}x{height} pair, view side {side} (split.max_view_size {settings.split.max_view_size})"
        )
        return IMAGE_TOO_LARGE, float(side), detail
    if side < settings.split.min_view_size:
        return VIEW_TOO_SMALL, float(side), ""
    try:
        pair.load()
    except Image.DecompressionBombError as err:  # a format plugin's own check (frames, tiles)
        return IMAGE_TOO_LARGE, float(side), error_detail(err)
    except (OSError, ValueError, SyntaxError) as err:
        return IMAGE_UNDECODABLE, None, error_detail(err)
    return pair, pad, side


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
        decoded = _decoded_pair(data, settings)
        if isinstance(decoded[0], str):
            reason, metric, detail = decoded
            result.drop(row, STAGE, reason, metric=metric, detail=detail)
            continue
        pair, pad, side = decoded
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
