import numpy as np
import pytest

from refany3d.evaluate.geometry import (
    geometry_metrics,
    point_map_foreground,
    rgb_silhouette,
    silhouette_iou,
)


def _shifted(point_map, mask, pixels=10, offset=0.15):
    """The point map moved `pixels` to the right and its coordinates pushed off the surface."""
    moved = np.roll(point_map, pixels, axis=1)
    fg = np.roll(mask, pixels, axis=1)
    return np.where(fg[..., None], np.clip(moved + offset, 0, 0.99), 1.0).astype(np.float32)


def _decoded(point_map, mask, seed=0):
    """The point map as a generator decodes it: an off-white background (15/255 below white),
    noise (sigma 4/255) everywhere and 1 % pastel speckle, quantised to 8 bits."""
    rng = np.random.default_rng(seed)
    out = np.where(mask[..., None], point_map, 1.0 - 15 / 255) + rng.normal(0, 4 / 255, point_map.shape)
    speckle = rng.random(mask.shape) < 0.01
    out[speckle] = 1.0 - 0.5 * rng.random((int(speckle.sum()), 3))
    return np.round(np.clip(out, 0, 1) * 255) / 255


def test_point_map_foreground_of_an_exact_render_is_its_non_white_pixels(perfect):
    _, pm, mask = perfect
    assert (point_map_foreground(pm) == mask).all()


def test_point_map_foreground_holds_on_a_decoded_point_map(perfect):
    _, pm, mask = perfect
    decoded = _decoded(pm, mask)
    assert silhouette_iou(point_map_foreground(decoded), mask) > 0.95
    # no pixel of the background counts just for not being exactly white
    assert point_map_foreground(decoded)[~mask].mean() < 0.005


def test_point_map_foreground_of_an_image_without_object_is_empty():
    rng = np.random.default_rng(1)
    for background in (1.0, 0.93):
        noisy = np.clip(background + rng.normal(0, 4 / 255, (48, 48, 3)), 0, 1)
        assert not point_map_foreground(np.round(noisy * 255) / 255).any()


def test_rgb_silhouette_finds_the_object_on_its_background(perfect):
    rgb, _, mask = perfect
    assert silhouette_iou(rgb_silhouette(rgb), mask) > 0.9


def test_geometry_metrics_order_perfect_shifted_wrong_texture(asset, perfect):
    rgb, pm, mask = perfect
    good = geometry_metrics(rgb, pm, asset)
    shifted = geometry_metrics(rgb, _shifted(pm, mask), asset)
    wrong = geometry_metrics(np.where(mask[..., None], 255 - rgb, rgb), pm, asset)

    assert good.silhouette_iou > 0.9 > shifted.silhouette_iou
    assert good.surface_distance < 2e-3 < 0.02 < shifted.surface_distance
    assert good.texture_error < 0.1  # > 0 from texture filtering in the render
    assert good.texture_error < shifted.texture_error and good.texture_error < wrong.texture_error
    assert wrong.texture_error > 0.2
    assert wrong.silhouette_iou > shifted.silhouette_iou  # the wrong texture has the right shape
    decoded = geometry_metrics(rgb, _decoded(pm, mask), asset)
    assert decoded.silhouette_iou > 0.8 and decoded.surface_distance < 0.02 < shifted.surface_distance


def test_geometry_metrics_empty_point_map_gives_nan(asset, perfect):
    rgb, pm, _ = perfect
    out = geometry_metrics(rgb, np.ones_like(pm), asset)
    assert np.isnan(out.surface_distance) and np.isnan(out.texture_error)
    assert out.silhouette_iou == pytest.approx(0.0)


def test_rgb_silhouette_leaves_opencv_rng_alone_and_does_not_depend_on_it():
    import cv2

    rng = np.random.default_rng(0)
    image = rng.integers(0, 90, (64, 64, 3), dtype=np.uint8)
    image[16:48, 20:50] = rng.integers(100, 255, (32, 30, 3))

    def draws() -> np.ndarray:
        out = np.zeros(4, np.float32)
        cv2.randu(out, 0, 1)
        return out

    cv2.setRNGSeed(7)
    plain = draws()
    cv2.setRNGSeed(7)
    first = rgb_silhouette(image)
    assert (draws() == plain).all()  # the caller's RNG is where it was
    assert (rgb_silhouette(image) == first).all()  # and its state does not change the mask
