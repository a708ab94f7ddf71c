import pytest
import torch

from refany3d.models.flux.attention import GroupAttention, group_mask
from refany3d.models.flux.positions import TokenLayout


def _qkv(layout: TokenLayout, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, layout.joint_len, 2, 16, generator=g, requires_grad=True) for _ in range(3)]


def test_group_mask_follows_the_group_rule():
    layout = TokenLayout(text=1, target=1, cond=1, views=2, point_map=True)
    # tokens: text, target RGB, RGB cond 0, RGB cond 1, point-map cond 0, point-map cond 1, target point map
    expected = [
        [1, 1, 1, 1, 1, 1, 1],  # text sees all
        [1, 1, 1, 1, 1, 1, 1],  # target RGB sees all
        [1, 1, 1, 0, 1, 0, 1],  # RGB cond 0: text, targets, itself, its point map
        [1, 1, 0, 1, 0, 1, 1],
        [1, 1, 1, 0, 1, 0, 1],  # point-map cond 0: text, targets, its RGB view, itself
        [1, 1, 0, 1, 0, 1, 1],
        [0, 1, 1, 1, 1, 1, 1],  # target point map: all but text
    ]
    assert group_mask(layout, text_agnostic=True).int().tolist() == expected
    assert group_mask(layout, text_agnostic=False)[-1].all()


@pytest.mark.parametrize("point_map", [True, False])
@pytest.mark.parametrize("text_agnostic", [True, False])
def test_grouped_attention_equals_dense_masked_reference(point_map, text_agnostic):
    layout = TokenLayout(text=3, target=6, cond=4, views=3, point_map=point_map)
    q, k, v = _qkv(layout)
    dense = GroupAttention(layout, "dense", text_agnostic, "cpu")(q, k, v)
    grads_dense = torch.autograd.grad(dense.square().sum(), (q, k, v))
    grouped = GroupAttention(layout, "grouped", text_agnostic, "cpu")(q, k, v)
    grads_grouped = torch.autograd.grad(grouped.square().sum(), (q, k, v))
    torch.testing.assert_close(grouped, dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_grouped, grads_dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_grouped_attention_without_conditions_equals_dense():
    layout = TokenLayout(text=3, target=6, cond=0, views=0, point_map=True)
    q, k, v = _qkv(layout)
    expected = GroupAttention(layout, "dense", True, "cpu")(q, k, v)
    torch.testing.assert_close(GroupAttention(layout, "grouped", True, "cpu")(q, k, v), expected)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_equals_dense_masked_reference():
    layout = TokenLayout(text=3, target=6, cond=4, views=3, point_map=True)
    q, k, v = (x.detach() for x in _qkv(layout, seed=1))
    expected = GroupAttention(layout, "dense", True, "cpu")(q, k, v)
    torch.testing.assert_close(
        GroupAttention(layout, "flex", True, "cpu")(q, k, v), expected, rtol=1e-4, atol=1e-5
    )


def test_group_mask_independent_conditions_see_only_their_pair():
    layout = TokenLayout(text=1, target=1, cond=1, views=2, point_map=True)
    mask = group_mask(layout, text_agnostic=True, independent_conditions=True).int().tolist()
    assert mask[2:6] == [
        [0, 0, 1, 0, 1, 0, 0],  # RGB cond 0: itself and its point map only
        [0, 0, 0, 1, 0, 1, 0],
        [0, 0, 1, 0, 1, 0, 0],
        [0, 0, 0, 1, 0, 1, 0],
    ]
    # text and targets keep their rule
    assert mask[:2] + mask[6:] == group_mask(layout, text_agnostic=True).int().tolist()[:2] + [
        [0, 1, 1, 1, 1, 1, 1]
    ]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kind", ["grouped", "flex"])
def test_group_attention_independent_conditions_equals_dense_masked_reference(kind):
    layout = TokenLayout(text=3, target=6, cond=4, views=3, point_map=True)
    q, k, v = (x.detach() for x in _qkv(layout, seed=2))
    expected = GroupAttention(layout, "dense", True, "cpu", independent_conditions=True)(q, k, v)
    got = GroupAttention(layout, kind, True, "cpu", independent_conditions=True)(q, k, v)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("text_agnostic", [True, False])
def test_group_attention_cached_conditions_equal_full_sequence(text_agnostic):
    """Text/target queries over [own keys + cached condition keys] = their rows of the full pass."""
    full = TokenLayout(text=3, target=6, cond=4, views=3, point_map=True)
    q, k, v = (x.detach() for x in _qkv(full, seed=3))
    expected = GroupAttention(full, "dense", text_agnostic, "cpu", independent_conditions=True)(q, k, v)
    head, tail = full.text + full.target, full.joint_len - full.target
    keep = torch.cat([torch.arange(head), torch.arange(tail, full.joint_len)])
    short = TokenLayout(text=3, target=6, cond=0, views=0, point_map=True)
    attention = GroupAttention(short, "grouped", text_agnostic, "cpu", independent_conditions=True)
    got = attention(q[:, keep], k[:, keep], v[:, keep], conditions=(k[:, head:tail], v[:, head:tail]))
    torch.testing.assert_close(got, expected[:, keep], rtol=1e-5, atol=1e-6)


def test_preferred_sdpa_puts_cudnn_first_and_restores_the_order():
    from torch.nn.attention import SDPBackend

    from refany3d.models.flux.attention import preferred_sdpa

    before = torch._C._get_sdp_priority_order()
    with preferred_sdpa("flash"):
        assert torch._C._get_sdp_priority_order() == before
    with preferred_sdpa("cudnn"):
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
    assert torch._C._get_sdp_priority_order() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN attention needs CUDA")
def test_grouped_attention_under_cudnn_runs_cudnn_and_matches_flash():
    from torch.profiler import ProfilerActivity, profile

    from refany3d.models.flux.attention import preferred_sdpa

    layout = TokenLayout(text=64, target=256, cond=256, views=2, point_map=True)
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, layout.joint_len, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
               .requires_grad_() for _ in range(3))  # fmt: skip
    attention = GroupAttention(layout, "grouped", True, "cuda")
    flash = attention(q, k, v)
    flash_grads = torch.autograd.grad(flash.float().square().sum(), (q, k, v))
    with preferred_sdpa("cudnn"), profile(activities=[ProfilerActivity.CPU]) as prof:
        cudnn = attention(q, k, v)
        cudnn_grads = torch.autograd.grad(cudnn.float().square().sum(), (q, k, v))
    ops = {e.key for e in prof.key_averages()}
    assert any("cudnn_attention" in op for op in ops), sorted(ops)
    torch.testing.assert_close(cudnn, flash, rtol=0, atol=1e-2)
    for a, b in zip(cudnn_grads, flash_grads):
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()
