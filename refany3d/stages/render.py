"""Render stage: what a training sample needs besides the photo, from the verified posed mesh.

Per sample, all renders on one uploaded mesh (`render.sample.render_sample`):
- the scene point map at the estimated pose: `point_map`, the 8-bit PNG the model sees
  (canonical XYZ normalised per axis over the mesh's bounding box to [0, 1], white off the
  object, DESIGN §5), and `point_map_raw`, lossless camera-frame XYZ (npz, key `xyz`, (H, W, 3)
  float32 metres, OpenCV axes, 0 off the object);
- `overlay`: that point map blended over the photo where the posed mesh covers it;
- `render.views` orbit views at equal azimuth steps (`view_azimuths_deg`), RGB on white and
  point map, `render.resolution`² each (`views_rgb`, `views_point_map`: JSON lists of PNG URIs);
- with `render.turntable`, an mp4 of a full turn, RGB | point map side by side (`turntable`).

Every file is deterministic in its inputs (PNG, a zip with fixed dates, a bit-exact mp4).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import zipfile

import numpy as np

from refany3d.config import BuildSettings, RenderSettings
from refany3d.records import (
    OVERLAY,
    POINT_MAP,
    POINT_MAP_RAW,
    TURNTABLE,
    VIEWS_POINT_MAP,
    VIEWS_RGB,
    Sample,
    StageResult,
)
from refany3d.render.cameras import backproject
from refany3d.render.point_maps import normalize_point_map, png_bytes, point_map_png
from refany3d.render.renderer import MeshScene
from refany3d.render.sample import render_sample
from refany3d.stages._posed import PosedView, missing_inputs, read_posed
from refany3d.stages._views import parallel_map, record
from refany3d.stages.context import StageContext

STAGE = "render"
EMPTY_RENDER = "empty_render"
MISSING_POSE = "missing_pose"

OVERLAY_ALPHA = 0.6  # point map opacity over the photo


def _npz(**arrays: np.ndarray) -> bytes:
    """An `np.load`-able npz, deflated (a float32 point map is 3 MB raw), its members dated
    1980-01-01 so that the bytes depend on the arrays only."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            payload = io.BytesIO()
            np.save(payload, np.ascontiguousarray(array), allow_pickle=False)
            zf.writestr(info, payload.getvalue())
    return buf.getvalue()


def _overlay(image: np.ndarray, unit: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the normalised point map `unit` ((H, W, 3) in [0, 1]) over `image` in `mask`."""
    blend = (1.0 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * 255.0 * unit
    return np.where(mask[..., None], np.round(blend), image).astype(np.uint8)


def _touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def _turntable(view: PosedView, scene: MeshScene, opts: RenderSettings) -> bytes:
    """mp4 bytes (H.264, bit-exact): `turntable_frames` orbit frames, RGB | 8-bit point map."""
    import imageio_ffmpeg

    size = opts.turntable_resolution
    frames_opts = dataclasses.replace(opts, views=opts.turntable_frames, resolution=size)
    h, w = view.mask.shape
    renders = render_sample(view.mesh, view.pose, view.intrinsics, w, h, frames_opts, scene)
    lo, hi = view.mesh.bounds
    with tempfile.TemporaryDirectory(prefix="refany3d-turntable-") as tmp:
        path = os.path.join(tmp, "turntable.mp4")
        writer = imageio_ffmpeg.write_frames(
            path,
            (2 * size, size),
            fps=opts.turntable_fps,
            codec="libx264",
            ffmpeg_log_level="error",
            # no encoder/version tags or dates, one thread: the same frames give the same bytes
            output_params=["-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1"]
            + ["-threads", "1"],
        )
        writer.send(None)
        for rgb, xyz, mask in zip(renders.orbit_rgb, renders.orbit_point_maps, renders.orbit_masks):
            pm = np.round(normalize_point_map(xyz, mask, lo, hi) * 255.0).astype(np.uint8)
            writer.send(np.ascontiguousarray(np.concatenate([rgb, pm], axis=1)))
        writer.close()
        with open(path, "rb") as fh:
            return fh.read()


def _render_one(sample: Sample, settings: BuildSettings, ctx: StageContext) -> Sample | tuple:
    """The kept sample with its render artifacts, or (reason, metric, detail) of its drop."""
    lacking = missing_inputs(sample)
    if lacking:
        return MISSING_POSE, None, f"lacks {lacking}"
    opts, store = settings.render, ctx.store
    view = read_posed(sample, store)
    h, w = view.mask.shape
    scene = MeshScene(view.mesh, normals="face" if opts.orbit_shading == "lit" else "none")
    renders = render_sample(view.mesh, view.pose, view.intrinsics, w, h, opts, scene)
    if not renders.scene_mask.any():
        return EMPTY_RENDER, 0.0, "the posed mesh covers no pixel of the view"
    lo, hi = view.mesh.bounds  # the canonical box: scene and orbit point maps share one encoding
    unit = normalize_point_map(renders.scene_point_map, renders.scene_mask, lo, hi)
    # canonical depth × scale = metric depth (see stages/_posed.py)
    xyz_camera = backproject(renders.scene_depth * np.float32(view.scale), view.intrinsics)
    jobs = [lambda: png_bytes(np.round(unit * 255.0).astype(np.uint8))]
    jobs += [lambda: png_bytes(_overlay(view.image, unit, renders.scene_mask))]
    jobs += [lambda: _npz(xyz=xyz_camera)]
    jobs += [lambda rgb=rgb: png_bytes(rgb) for rgb in renders.orbit_rgb]
    jobs += [
        lambda xyz=xyz, m=m: point_map_png(xyz, m, lo, hi)
        for xyz, m in zip(renders.orbit_point_maps, renders.orbit_masks)
    ]
    pm_png, overlay_png, raw, *views = parallel_map(lambda job: job(), jobs)
    out = sample.replace(view_azimuths_deg=[360.0 * k / opts.views for k in range(opts.views)])
    out.artifacts[POINT_MAP] = store.put_content("point_map", pm_png, ".png")
    out.artifacts[OVERLAY] = store.put_content("overlay", overlay_png, ".png")
    out.artifacts[POINT_MAP_RAW] = store.put_content("point_map_raw", raw, ".npz")
    uris = [store.put_content("view", png, ".png") for png in views]
    out.artifacts[VIEWS_RGB] = json.dumps(uris[: opts.views])
    out.artifacts[VIEWS_POINT_MAP] = json.dumps(uris[opts.views :])
    if opts.turntable:
        out.artifacts[TURNTABLE] = store.put_content("turntable", _turntable(view, scene, opts), ".mp4")
    out.metrics["point_map_coverage"] = float(renders.scene_mask.mean())
    # views where the object reaches the image border, i.e. is cut off (render.distance too small)
    out.metrics["orbit_clipped_views"] = float(sum(_touches_border(m) for m in renders.orbit_masks))
    return out


def render(samples: list[Sample], settings: BuildSettings, ctx: StageContext) -> StageResult:
    """Point maps, overlay, orbit views (and turntable) of each verified sample, into the store."""
    result = StageResult()
    record(result, STAGE, None, samples, [_render_one(s, settings, ctx) for s in samples])
    return result
