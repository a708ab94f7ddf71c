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
