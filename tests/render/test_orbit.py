import io

import cv2
import numpy as np
from PIL import Image

from refany3d.render.orbit import render_orbit_views, turntable


def _camera_centre(view) -> np.ndarray:
    """Camera centre in the object frame, recovered from the point map alone (PnP: canonical
    point per pixel ↔ that pixel), independent of the pose the renderer used."""
    rows, cols = np.nonzero(view.mask)
    canon = view.point_map[rows, cols].astype(np.float64)
    pixels = np.stack([cols, rows], axis=1).astype(np.float64)
    ok, rvec, tvec = cv2.solvePnP(canon, pixels, view.intrinsics, None, flags=cv2.SOLVEPNP_EPNP)
    ok, rvec, tvec = cv2.solvePnP(canon, pixels, view.intrinsics, None, rvec, tvec, True)
    assert ok
    rot = cv2.Rodrigues(rvec)[0]
    return -rot.T @ tvec.ravel()


def test_render_orbit_views_are_equal_azimuth_steps(textured_object):
    n = 6
    views = render_orbit_views(textured_object, n, 64, elevation_deg=25.0, distance=2.8, fov_deg=40.0)
    assert len(views) == n
    center = textured_object.bounds.mean(0)
    azimuths = []
    for v in views:
        assert v.rgb.shape == (64, 64, 3) and v.point_map.shape == (64, 64, 3) and v.mask.any()
        # white background, pixel-aligned with the mask (antialiased edges aside)
        near = cv2.dilate(v.mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        assert (v.rgb[~near] == 255).all() and (v.rgb[v.mask] != 255).any(axis=-1).mean() > 0.5
        c = _camera_centre(v) - center
        azimuths.append(np.degrees(np.arctan2(c[0], c[2])))
        elevation = np.degrees(np.arctan2(c[1], np.hypot(c[0], c[2])))
        assert abs(elevation - 25.0) < 0.5
    steps = np.diff(np.unwrap(np.radians(azimuths)))
    np.testing.assert_allclose(np.degrees(steps), 360.0 / n, atol=0.5)


def test_render_orbit_views_point_map_is_canonical(textured_object):
    """Point-map positions lie inside the mesh's own bounding box (not the normalised one)."""
    (view,) = render_orbit_views(textured_object, 1, 48)
    pts = view.point_map[view.mask]
    lo, hi = textured_object.bounds
    assert (pts >= lo - 1e-4).all() and (pts <= hi + 1e-4).all()
    assert (pts.max(0) - pts.min(0)).max() > 0.5 * (hi - lo).max()


def test_turntable_is_an_animation(textured_object):
    data = turntable(textured_object, frames=4, resolution=32)
    image = Image.open(io.BytesIO(data))
    assert image.format == "WEBP" and image.n_frames == 4 and image.size == (64, 32)
