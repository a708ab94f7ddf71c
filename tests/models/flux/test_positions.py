import pytest
import torch

from refany3d.models.flux.positions import TokenLayout, token_ids

LAYOUT = TokenLayout(text=4, target=6, cond=4, views=3, point_map=True)


def _split(img_ids):
    lt, lc, n = LAYOUT.target, LAYOUT.cond, LAYOUT.views
    rgb, conds, target_pm = img_ids[:lt], img_ids[lt : lt + 2 * n * lc], img_ids[lt + 2 * n * lc :]
    return rgb, conds.view(2 * n, lc, 3), target_pm


def test_token_ids_shared_positions_point_map_reuses_rgb_and_conditions_shift_width():
    txt_ids, img_ids = token_ids(LAYOUT, (2, 3), (2, 2), shared_positions=True)
    assert txt_ids.shape == (4, 3) and not txt_ids.any()
    assert img_ids.shape == (LAYOUT.image_len, 3)
    rgb, conds, target_pm = _split(img_ids)
    assert torch.equal(rgb, torch.tensor([[0, r, c] for r in range(2) for c in range(3)]).float())
    assert torch.equal(target_pm, rgb)
    expected = torch.tensor([[0, r, c - 3] for r in range(2) for c in range(2)]).float()  # -(target width)
    for view in conds:  # all conditions, RGB and point map, share the same ids
        assert torch.equal(view, expected)


def test_token_ids_without_shared_positions_point_maps_differ_from_rgb():
    _, img_ids = token_ids(LAYOUT, (2, 3), (2, 2), shared_positions=False)
    rgb, conds, target_pm = _split(img_ids)
    assert not torch.equal(target_pm, rgb)
    assert torch.equal(target_pm[:, 1:], rgb[:, 1:])  # same grid, other first-axis index
    assert not torch.equal(conds[0], conds[LAYOUT.views])


def test_token_ids_wrong_size_raises():
    with pytest.raises(ValueError, match="target_size"):
        token_ids(LAYOUT, (3, 3), (2, 2), shared_positions=True)


def test_kind_and_view_follow_the_sequence_order():
    kind, view = LAYOUT.kind_and_view()
    assert kind.tolist() == [0] * 4 + [1] * 6 + [2] * 12 + [3] * 12 + [4] * 6
    cond_views = [v for v in range(3) for _ in range(4)]
    assert view.tolist() == [-1] * 10 + cond_views + cond_views + [-1] * 6
