import numpy as np

from refany3d.render.point_maps import decode_point_map, encode_point_map, normalize_point_map


def _sample():
    rng = np.random.default_rng(0)
    lo, hi = np.array([-0.2, 0.0, -0.1]), np.array([0.2, 0.5, 0.1])
    xyz = (lo + rng.random((24, 32, 3)) * (hi - lo)).astype(np.float32)
    mask = rng.random((24, 32)) > 0.3
    return xyz, mask, lo, hi


def test_normalize_point_map_is_per_axis_with_white_background():
    xyz, mask, lo, hi = _sample()
    unit = normalize_point_map(xyz, mask, lo, hi)
    assert (unit[~mask] == 1.0).all()
    np.testing.assert_allclose(unit[mask], (xyz[mask] - lo) / (hi - lo), atol=1e-6)
    assert unit[mask][:, 1].max() > 0.95 and unit[mask][:, 1].min() < 0.05  # y spans its own range


def test_encode_point_map_round_trips_16bit():
    xyz, mask, lo, hi = _sample()
    png8, png16 = encode_point_map(xyz, mask, lo, hi)
    back, back_mask = decode_point_map(png16, lo, hi)
    np.testing.assert_array_equal(back_mask, mask)
    assert np.abs(back[mask] - xyz[mask]).max() <= (hi - lo).max() / 65535
    back8, mask8 = decode_point_map(png8, lo, hi)
    np.testing.assert_array_equal(mask8, mask)
    assert np.abs(back8[mask] - xyz[mask]).max() <= (hi - lo).max() / 255


def test_normalize_point_map_clips_positions_outside_the_box_to_its_faces():
    # a posed render's surface can poke out of the box it is normalised over (another mesh's
    # bounds, rasterisation at silhouettes); unclipped, 8-bit encoding wraps -0.1 to 230/255
    lo, hi = np.zeros(3), np.ones(3)
    xyz = np.array([[[-0.1, 0.5, 1.2], [0.25, -3.0, 7.0]]], dtype=np.float32)
    mask = np.ones((1, 2), bool)
    unit = normalize_point_map(xyz, mask, lo, hi)
    np.testing.assert_array_equal(unit, [[[0.0, 0.5, 1.0], [0.25, 0.0, 1.0]]])
    back, _ = decode_point_map(encode_point_map(xyz, mask, lo, hi)[0], lo, hi)
    np.testing.assert_allclose(back, [[[0.0, 128 / 255, 1.0], [64 / 255, 0.0, 1.0]]], atol=1e-6)
