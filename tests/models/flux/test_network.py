"""Tests that bite on the parts of the network a realistic breakage would slip past: the domain
switcher's maths and training, LoRA routing on the AdaLN modulation linears, the adapters' target
list and init, the token slice each output head reads, `shared_positions` through `forward`, and
the missing-key check when adapters load."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import refany3d.models.flux.transformer as transformer
from refany3d.models.flux import flow_matching_loss, load_adapters, save_adapters
from refany3d.models.flux.io import ADAPTER_WEIGHTS, SWITCHER_WEIGHTS
from refany3d.models.flux.lora import DOMAIN, REFERENCE, TARGET_MODULES, lora_routes, routed_linear
from refany3d.models.flux.positions import (
    COND_POINT_MAP,
    COND_RGB,
    NUM_KINDS,
    TARGET_POINT_MAP,
    TARGET_RGB,
    TEXT,
    TokenLayout,
    token_ids,
)

from .conftest import BATCH, COND_HW, TARGET_HW, VIEWS, forward, make_batch, make_model

LAYOUT = TokenLayout(text=5, target=6, cond=4, views=VIEWS, point_map=True)


def _randomise(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# --------------------------------------------------------------------------- domain switcher


def test_domain_switcher_is_linear_silu_linear_of_the_domain_embedding():
    switcher = make_model().domain_switcher
    _randomise(switcher)
    out = switcher(torch.tensor([0, 1, 1, 0]))
    for row, domain in zip(out, (0, 1, 1, 0)):
        e = switcher.embedding.weight[domain]
        h = torch.nn.functional.silu(e @ switcher.linear_1.weight.T + switcher.linear_1.bias)
        torch.testing.assert_close(row, h @ switcher.linear_2.weight.T + switcher.linear_2.bias)
    assert not torch.allclose(out[0], out[1])  # the domain index matters
    assert switcher.embedding.weight.shape == (2, 256)


def test_domain_switcher_starts_at_zero_and_trains_with_the_adapters():
    model = make_model()
    switcher = model.domain_switcher
    assert torch.count_nonzero(switcher(torch.arange(2))) == 0  # untrained model equals Flux
    trainable = {id(p) for p in model.trainable_parameters()}
    assert all(id(p) in trainable and p.requires_grad for p in switcher.parameters())
    flow_matching_loss(model, make_batch(), torch.Generator().manual_seed(0)).backward()
    assert switcher.linear_2.weight.grad.abs().sum() > 0  # zero-init last layer still learns
    _randomise(switcher.linear_2, seed=1)
    model.zero_grad()
    flow_matching_loss(model, make_batch(), torch.Generator().manual_seed(0)).backward()
    for name in ("embedding", "linear_1", "linear_2"):
        assert getattr(switcher, name).weight.grad.abs().sum() > 0, name


def test_domain_switcher_embedding_reaches_both_domains_groups(monkeypatch):
    model = make_model()
    _randomise(model.domain_switcher)
    emb = model.group_embeddings(torch.full((2,), 0.5), torch.ones(2), torch.randn(2, 32))
    rgb, pm = model.domain_switcher(torch.arange(2))
    torch.testing.assert_close(emb[:, TARGET_POINT_MAP] - emb[:, TARGET_RGB], (pm - rgb).expand(2, -1))
    torch.testing.assert_close(emb[:, COND_POINT_MAP] - emb[:, COND_RGB], (pm - rgb).expand(2, -1))


# --------------------------------------------------------------------------- LoRA on the modulation


@pytest.mark.parametrize("adapter", [REFERENCE, DOMAIN])
@pytest.mark.parametrize("block", ["double", "single"])
def test_routed_linear_modulation_adapter_changes_only_its_kinds(adapter, block):
    model = make_model()
    flux = model.flux
    layer = (
        flux.transformer_blocks[0].norm1.linear
        if block == "double"
        else flux.single_transformer_blocks[0].norm.linear
    )
    torch.nn.init.normal_(layer.lora_B[adapter].weight, std=0.5)
    routes = lora_routes(LAYOUT, domain_lora=True)
    kinds = list(range(TARGET_RGB, NUM_KINDS)) if block == "double" else list(range(NUM_KINDS))
    x = torch.randn(BATCH, len(kinds), layer.in_features)
    with torch.no_grad():
        out = routed_linear(layer, x, routes.image_kinds if block == "double" else routes.joint_kinds)
        changed = (out - layer.base_layer(x)).abs().amax(dim=(0, 2)) > 0
    expected = {REFERENCE: {COND_RGB, COND_POINT_MAP}, DOMAIN: {COND_POINT_MAP, TARGET_POINT_MAP}}[adapter]
    assert {k for k, c in zip(kinds, changed.tolist()) if c} == expected


def test_forward_uses_modulation_lora_of_the_point_map_kinds(monkeypatch):
    model = make_model()
    batch = make_batch()
    with torch.no_grad():
        before = forward(model, batch)
        torch.nn.init.normal_(model.flux.transformer_blocks[0].norm1.linear.lora_B[DOMAIN].weight, std=0.5)
        after = forward(model, batch)
    assert not torch.allclose(before.point_map, after.point_map)


# --------------------------------------------------------------------------- targets and init


def _lora_modules(model, adapter: str) -> set[str]:
    return {
        n.removeprefix("flux.").rsplit(".lora_A", 1)[0]
        for n, _ in model.named_parameters()
        if f"lora_A.{adapter}." in n
    }


@pytest.mark.parametrize("adapter", [REFERENCE, DOMAIN])
def test_add_adapters_targets_exactly_the_design_list(adapter):
    model = make_model()
    double = ["norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2"]
    single = ["norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v"]
    expected = {"x_embedder"}
    expected |= {
        f"transformer_blocks.{i}.{m}" for i in range(len(model.flux.transformer_blocks)) for m in double
    }
    expected |= {
        f"single_transformer_blocks.{i}.{m}"
        for i in range(len(model.flux.single_transformer_blocks))
        for m in single
    }
    assert _lora_modules(model, adapter) == expected
    assert re.fullmatch(TARGET_MODULES, "proj_out") is None


def test_add_adapters_gaussian_init_and_zero_up_projection():
    model = make_model(seed=3)
    a = torch.cat([p.flatten() for n, p in model.named_parameters() if "lora_A" in n])
    b = torch.cat([p.flatten() for n, p in model.named_parameters() if "lora_B" in n])
    assert torch.count_nonzero(b) == 0
    std = 1 / model.lora_configs[REFERENCE].r  # peft's gaussian init: N(0, 1/r)
    assert abs(a.std().item() - std) < 0.05 * std and abs(a.mean().item()) < 0.05 * std
    kurtosis = ((a - a.mean()) ** 4).mean() / a.var() ** 2
    assert 2.7 < kurtosis < 3.3  # normal (uniform init would give 1.8)


# --------------------------------------------------------------------------- output heads


def test_forward_output_heads_read_their_target_slices(monkeypatch):
    model = make_model()
    _randomise(model.domain_switcher)  # the two targets' embeddings differ only by the switcher
    batch = make_batch()
    joints, embs = [], []
    original_single = transformer.single_block_forward
    monkeypatch.setattr(
        transformer, "single_block_forward", lambda *a: joints.append(original_single(*a)) or joints[-1]
    )
    original_emb = model.group_embeddings
    monkeypatch.setattr(model, "group_embeddings", lambda *a: embs.append(original_emb(*a)) or embs[-1])
    with torch.no_grad():
        out = forward(model, batch)
        joint, emb = joints[-1], embs[-1]
        lt = TARGET_HW[0] * TARGET_HW[1]
        text = batch.text.shape[1]
        rgb = model.flux.proj_out(model.flux.norm_out(joint[:, text : text + lt], emb[:, TARGET_RGB]))
        pm = model.flux.proj_out(model.flux.norm_out(joint[:, -lt:], emb[:, TARGET_POINT_MAP]))
    torch.testing.assert_close(out.rgb, rgb, rtol=0, atol=0)
    torch.testing.assert_close(out.point_map, pm, rtol=0, atol=0)
    assert not torch.allclose(rgb, pm)


# --------------------------------------------------------------------------- positions through forward


@pytest.mark.parametrize("shared", [True, False])
def test_forward_passes_its_shared_positions_ids_to_rope(shared, monkeypatch):
    model = make_model(shared_positions=shared)
    batch = make_batch()
    seen = []
    original = model.flux.pos_embed.forward
    monkeypatch.setattr(model.flux.pos_embed, "forward", lambda ids: seen.append(ids) or original(ids))
    with torch.no_grad():
        forward(model, batch)
    layout = TokenLayout(text=batch.text.shape[1], target=6, cond=4, views=VIEWS, point_map=True)
    txt, img = token_ids(layout, TARGET_HW, COND_HW, shared_positions=shared)
    torch.testing.assert_close(seen[0], torch.cat([txt, img]), rtol=0, atol=0)


def test_forward_shared_positions_changes_the_point_map_output():
    batch = make_batch()
    with torch.no_grad():
        shared = forward(make_model(shared_positions=True), batch)
        apart = forward(make_model(shared_positions=False), batch)
    torch.testing.assert_close(shared.rgb[:, :0], apart.rgb[:, :0])
    assert not torch.allclose(shared.point_map, apart.point_map)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("adapter", [REFERENCE, DOMAIN])
def test_load_adapters_missing_key_raises(tmp_path, adapter):
    save_adapters(make_model(), tmp_path)
    path = tmp_path / adapter / ADAPTER_WEIGHTS
    state = load_file(path)
    state.pop("transformer_blocks.0.norm1.linear.lora_B.weight")
    save_file(state, path)
    with pytest.raises(ValueError, match="missing.*norm1"):
        load_adapters(make_model(), tmp_path)


def test_load_adapters_unexpected_key_raises(tmp_path):
    save_adapters(make_model(), tmp_path)
    path = tmp_path / REFERENCE / ADAPTER_WEIGHTS
    state = load_file(path)
    state["proj_out.lora_A.weight"] = torch.zeros(16, 64)
    save_file(state, path)
    with pytest.raises(ValueError, match="unexpected"):
        load_adapters(make_model(), tmp_path)


def test_load_adapters_missing_switcher_key_raises(tmp_path):
    save_adapters(make_model(), tmp_path)
    state = load_file(tmp_path / SWITCHER_WEIGHTS)
    state.pop("linear_2.weight")
    save_file(state, tmp_path / SWITCHER_WEIGHTS)
    with pytest.raises(RuntimeError, match="linear_2.weight"):
        load_adapters(make_model(), tmp_path)


def test_group_kinds_constants_in_sequence_order():
    assert (TEXT, TARGET_RGB, COND_RGB, COND_POINT_MAP, TARGET_POINT_MAP) == (0, 1, 2, 3, 4)
