"""Each error mode of the `truth` depth and segmenter backends, tested by its effect on an exact
view (a disc in front of nothing: what `refany3d.synthetic.perception_errors` is given)."""

import cv2
import numpy as np
import pytest

from refany3d.config import DepthSettings, SegmenterSettings
from refany3d.synthetic.perception_errors import DepthErrors, MaskErrors, erred_depth, erred_mask

SIZE = 160
NONE_DEPTH = DepthErrors(scale=0.0, low_frequency=0.0, noise=0.0, flying_px=0, backdrop=None)
NONE_MASK = MaskErrors(wobble_px=0.0, bias_px=0.0, ragged_px=0.0, bleed_px=0.0, bleed_arc=0.0)


def _view(radius: float = 40.0):
    """(mask, depth): a hemisphere of `radius` px at 1 m, seen head-on (depth 0 off it)."""
    yy, xx = np.mgrid[:SIZE, :SIZE] - SIZE / 2 + 0.5
    rr = np.hypot(yy, xx)
    mask = rr < radius
    depth = np.where(mask, 1.0 - 0.1 * np.sqrt(np.clip(1 - (rr / radius) ** 2, 0, 1)), 0.0)
    return mask, depth


def _depth(errors, seed=0):
    mask, depth = _view()
    return mask, depth, erred_depth(depth, mask, errors, np.random.default_rng(seed))


def _ring(mask, inner: int, outer: int) -> np.ndarray:
    """Pixels outside `mask` between `inner` and `outer` px from it."""
    dist = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 3)
    return (dist > inner) & (dist <= outer)


def test_defaults_are_the_truth_backends_settings():
    assert DepthErrors.of(DepthSettings()).backdrop == (1.15, 2.0)
    assert (
        DepthErrors.of(DepthSettings()).flying_px == 3 and MaskErrors.of(SegmenterSettings()).bleed_px == 5.0
    )
    assert DepthErrors.of(DepthSettings(truth_backdrop_min=0.0)).backdrop is None


def test_backdrop_covers_the_whole_frame_behind_the_object():
    mask, depth, out = _depth(DepthErrors(0.0, 0.0, 0.0, 0, (1.3, 1.5)))
    assert np.all(out.depth > 0)
    far = out.depth[_ring(mask, 8, 400)]
    assert np.median(far) > 1.2 * depth[mask].max()
    np.testing.assert_allclose(out.depth[mask], depth[mask], rtol=1e-6)  # the object is untouched
    assert np.all(erred_depth(depth, mask, NONE_DEPTH, np.random.default_rng(0)).depth[~mask] == 0)


def test_flying_pixels_blend_object_and_backdrop_across_the_silhouette():
    mask, depth, out = _depth(DepthErrors(0.0, 0.0, 0.0, 3, (1.5, 1.5)))
    _, _, sharp = _depth(DepthErrors(0.0, 0.0, 0.0, 0, (1.5, 1.5)))  # the same backdrop, no smear
    near = _ring(mask, 0, 2)
    assert np.all(out.depth[near] < 0.97 * sharp.depth[near]) and np.all(out.depth[near] > depth[mask].max())
    inside_edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert np.all(out.depth[inside_edge] > depth[inside_edge] * 1.01)  # smeared away from the camera
    deep = cv2.erode(mask.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    np.testing.assert_allclose(out.depth[deep], depth[deep], rtol=1e-6)


def test_global_scale_error_is_one_factor_for_the_whole_view():
    mask, depth, out = _depth(dataclasses_replace(NONE_DEPTH, scale=0.2), seed=3)
    ratio = out.depth[mask] / depth[mask]
    assert ratio.std() < 1e-6 and ratio.mean() == pytest.approx(out.scale, rel=1e-5)
    assert abs(np.log(out.scale)) > 1e-3 and out.local_scale == pytest.approx(out.scale)


def test_low_frequency_error_is_smooth_and_its_mean_over_the_object_is_reported():
    mask, depth, out = _depth(dataclasses_replace(NONE_DEPTH, low_frequency=0.05), seed=1)
    log_ratio = np.log(out.depth[mask] / depth[mask])
    assert log_ratio.std() > 1e-3  # it varies over the object...
    field = np.log(np.where(mask, out.depth / np.where(mask, depth, 1), 1.0))
    step = np.abs(np.diff(field, axis=1))[mask[:, 1:] & mask[:, :-1]]
    assert step.max() < 0.01 * log_ratio.std() * 10  # ...smoothly, with no pixel-to-pixel jumps
    assert np.log(out.local_scale) == pytest.approx(log_ratio.mean(), abs=1e-6)


def test_per_pixel_noise_has_its_relative_std():
    mask, depth, out = _depth(dataclasses_replace(NONE_DEPTH, noise=0.01))
    assert np.std(out.depth[mask] / depth[mask] - 1) == pytest.approx(0.01, rel=0.1)


def _mask(errors, seed=0, radius=40.0):
    mask, _ = _view(radius)
    return mask, erred_mask(mask, errors, np.random.default_rng(seed))


def test_mask_bias_grows_or_shrinks_the_whole_mask():
    grown = [_mask(dataclasses_replace(NONE_MASK, bias_px=2.0), seed) for seed in range(6)]
    radii = [np.sqrt(out.sum() / np.pi) - np.sqrt(mask.sum() / np.pi) for mask, out in grown]
    assert min(radii) < -0.3 and max(radii) > 0.3 and max(abs(r) for r in radii) <= 2.2


def test_mask_wobble_and_ragged_edges_move_only_the_boundary():
    for errors in (
        dataclasses_replace(NONE_MASK, wobble_px=2.0),
        dataclasses_replace(NONE_MASK, ragged_px=1.0),
    ):
        mask, out = _mask(errors)
        changed = mask ^ out
        assert changed.any()
        yy, xx = np.nonzero(changed)
        assert np.all(np.abs(np.hypot(yy - SIZE / 2 + 0.5, xx - SIZE / 2 + 0.5) - 40) < 3.5)
    # ragged edges change the outline in many small pieces; a wobble in a few long stretches
    pieces = [
        cv2.connectedComponents((m ^ out).astype(np.uint8))[0] - 1
        for m, out in (_mask(dataclasses_replace(NONE_MASK, ragged_px=1.0)), _mask(dataclasses_replace(NONE_MASK, wobble_px=2.0)))
    ]  # fmt: skip
    assert pieces[0] > 3 * pieces[1], pieces


def test_mask_bleeds_onto_the_background_on_one_stretch_only():
    mask, out = _mask(dataclasses_replace(NONE_MASK, bleed_px=6.0, bleed_arc=0.5))
    bled = out & _ring(mask, 3, 10)  # reaches well past any boundary wobble...
    assert bled.sum() > 20
    yy, xx = np.nonzero(bled)
    spread = np.hypot(yy - yy.mean(), xx - xx.mean()).max()
    assert spread < 0.6 * 40  # ...around one place of the outline, not all round it
    assert not (out & ~mask & _ring(mask, 0, 400)).sum() > 2 * bled.sum() + 400


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)
