import io
import json

import numpy as np
import pytest
from PIL import Image

from refany3d.config import override
from refany3d.records import MESH, OVERLAY, POINT_MAP, POINT_MAP_RAW, TURNTABLE, VIEWS_POINT_MAP, VIEWS_RGB
from refany3d.render.cameras import project
from refany3d.render.mesh import load_mesh
from refany3d.render.point_maps import decode_point_map
from refany3d.stages.render import EMPTY_RENDER, MISSING_POSE, render
from refany3d.testing.posed import posed_samples


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    from refany3d.synthetic import read_truth

    samples, ctx, settings = posed_samples(tmp_path_factory.mktemp("render"), rows=1, size=256)
    result = render(samples, settings, ctx)
    truths = [read_truth(s.source_ref, s.side) for s in samples]
    return samples, result, truths, ctx, settings


def _png(store, uri) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(store.get(uri))))


def test_render_point_map_aligns_with_the_image_within_a_pixel(rendered):
    samples, result, truths, ctx, _ = rendered
    assert len(result.kept) == len(samples) and not result.dropped
    for s, truth in zip(result.kept, truths):
        k, pose, scale = truth.intrinsics, np.reshape(s.pose, (4, 4)), s.mesh_scale
        lo, hi = load_mesh(ctx.store.get(s.artifacts[MESH]), file_type="glb").bounds
        canonical, mask = decode_point_map(ctx.store.get(s.artifacts[POINT_MAP]), lo, hi)
        assert (mask & truth.mask).sum() / (mask | truth.mask).sum() > 0.99  # silhouette = the photo's
        rows, cols = np.nonzero(mask)
        cam = (scale * canonical[mask]) @ pose[:3, :3].T + pose[:3, 3]  # x_cam = R (s x) + t
        err = np.linalg.norm(project(cam, k) - np.stack([cols, rows], 1), axis=1)
        assert np.percentile(err, 95) < 1.0 and np.median(err) < 0.5, (np.median(err), err.max())
        xyz = np.load(io.BytesIO(ctx.store.get(s.artifacts[POINT_MAP_RAW])))["xyz"]
        raw_mask = xyz[..., 2] > 0
        assert np.array_equal(raw_mask, mask) and xyz.dtype == np.float32
        err_raw = np.linalg.norm(project(xyz[raw_mask], k) - np.stack([cols, rows], 1), axis=1)
        assert err_raw.max() < 1e-3
        both = raw_mask & truth.mask
        assert np.allclose(xyz[..., 2][both], truth.depth[both], rtol=1e-4)  # metres, true depth


def test_render_orbit_views_are_512_px_at_equal_azimuth_steps(rendered):
    _, result, _, ctx, settings = rendered
    for s in result.kept:
        rgb, pm = json.loads(s.artifacts[VIEWS_RGB]), json.loads(s.artifacts[VIEWS_POINT_MAP])
        assert len(rgb) == len(pm) == settings.render.views == 8
        assert s.view_azimuths_deg == [45.0 * i for i in range(8)]
        assert s.metrics["orbit_clipped_views"] == 0  # the whole object is in every view
        for a, b in zip(rgb, pm):
            image, points = _png(ctx.store, a), _png(ctx.store, b)
            assert image.shape == points.shape == (512, 512, 3)
            assert (points == 255).all(-1)[0, 0] and not (points == 255).all(-1).all()  # white background
        overlay, image = _png(ctx.store, s.artifacts[OVERLAY]), _png(ctx.store, s.artifacts["image"])
        off = (_png(ctx.store, s.artifacts[POINT_MAP]) == 255).all(-1)
        assert np.array_equal(overlay[off], image[off]) and not np.array_equal(overlay, image)


def test_render_twice_gives_identical_artifacts(rendered):
    samples, result, _, ctx, settings = rendered
    again = render(samples, settings, ctx)
    assert [s.artifacts for s in again.kept] == [s.artifacts for s in result.kept]


def test_render_turntable_is_a_deterministic_side_by_side_mp4(rendered, tmp_path):
    import imageio_ffmpeg

    samples, _, _, ctx, settings = rendered
    settings = override(settings, **{"render.turntable": True, "render.turntable_frames": 6})
    first, second = (render(samples[:1], settings, ctx).kept[0] for _ in range(2))
    assert first.artifacts[TURNTABLE] == second.artifacts[TURNTABLE]
    path = tmp_path / "turntable.mp4"
    path.write_bytes(ctx.store.get(first.artifacts[TURNTABLE]))
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    frames = list(reader)
    assert meta["size"] == (512, 256) and len(frames) == 6


def test_render_drops_missing_pose_and_empty_render(rendered):
    samples, _, _, ctx, settings = rendered
    behind = np.reshape(samples[0].pose, (4, 4)).copy()
    behind[2, 3] = -behind[2, 3]  # the object behind the camera: nothing to see
    result = render(
        [samples[0].replace(pose=None), samples[0].replace(pose=[float(v) for v in behind.ravel()])],
        settings,
        ctx,
    )
    assert [r.reason for r in result.dropped] == ["missing_pose", "empty_render"]
    assert (MISSING_POSE, EMPTY_RENDER) == ("missing_pose", "empty_render")
