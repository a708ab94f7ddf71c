import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel

import refany3d.models.flux.transformer as transformer
from refany3d.config import ModelSettings
from refany3d.models.flux import RefAny3DTransformer, build_model
from refany3d.models.flux.lora import DOMAIN, REFERENCE
from refany3d.models.flux.positions import (
    COND_POINT_MAP,
    COND_RGB,
    TARGET_POINT_MAP,
    TARGET_RGB,
    TEXT,
    TokenLayout,
    token_ids,
)
from refany3d.models.flux.transformer import TINY_FLUX_CONFIG

from .conftest import BATCH, COND_HW, TARGET_HW, VIEWS, forward, make_batch, make_model

LT, LC = TARGET_HW[0] * TARGET_HW[1], COND_HW[0] * COND_HW[1]


def _double_block_outputs(model, batch, monkeypatch):
    """Image hidden states after the first double block (the first layer's output)."""
    seen = []
    original = transformer.double_block_forward

    def recording(*args):
        out = original(*args)
        seen.append(out[0].detach())
        return out

    monkeypatch.setattr(transformer, "double_block_forward", recording)
    with torch.no_grad():
        forward(model, batch)
    monkeypatch.undo()
    return seen[0]


def _image_slices(views=VIEWS):
    """Image-token slices: target RGB, RGB cond k, point-map cond k, target point map."""
    rgb = slice(0, LT)
    cond = [slice(LT + k * LC, LT + (k + 1) * LC) for k in range(views)]
    pm_cond = [slice(LT + (views + k) * LC, LT + (views + k + 1) * LC) for k in range(views)]
    return rgb, cond, pm_cond, slice(LT + 2 * views * LC, None)


def test_forward_at_init_equals_plain_flux_without_conditions():
    torch.manual_seed(0)
    flux = FluxTransformer2DModel(**TINY_FLUX_CONFIG)
    plain = copy.deepcopy(flux)
    model = RefAny3DTransformer(flux, point_map_branch=False, attention="grouped")
    batch = make_batch(views=0, point_map=False)
    t = torch.full((BATCH,), 0.3)
    layout = TokenLayout(text=batch.text.shape[1], target=LT, cond=0, views=0, point_map=False)
    txt_ids, img_ids = token_ids(layout, TARGET_HW, None, shared_positions=True)
    with torch.no_grad():
        ours = forward(model, batch, timestep=0.3).rgb
        expected = plain(
            hidden_states=batch.target_rgb,
            encoder_hidden_states=batch.text,
            pooled_projections=batch.pooled,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=torch.ones_like(t),
        ).sample
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("text_agnostic", [True, False])
def test_forward_text_agnostic_point_map_attention_ignores_text(text_agnostic, monkeypatch):
    model = make_model(text_agnostic=text_agnostic)
    batch = make_batch()
    other = make_batch()
    other = type(batch)(**{**batch.__dict__, "text": batch.text + 1.0})
    outs = []

    class Recording(transformer.GroupAttnProcessor):
        def __call__(self, *args):
            out = super().__call__(*args)
            outs.append(out[0].detach() if isinstance(out, tuple) else out)
            return out

    model.processor = Recording()
    for b in (batch, other):
        with torch.no_grad():
            forward(model, b)
    rgb, _, _, target_pm = _image_slices()
    first, second = outs[0], outs[2]  # first double block's image attention output, per batch
    assert not torch.allclose(first[:, rgb], second[:, rgb])
    assert torch.allclose(first[:, target_pm], second[:, target_pm], atol=1e-6) == text_agnostic


def test_forward_group_mask_condition_sees_only_its_pair(monkeypatch):
    model = make_model()
    batch = make_batch()
    cond_rgb = batch.cond_rgb.clone()
    cond_rgb[:, 1] += 1.0  # perturb RGB condition j = 1
    perturbed = type(batch)(**{**batch.__dict__, "cond_rgb": cond_rgb})
    before = _double_block_outputs(model, batch, monkeypatch)
    after = _double_block_outputs(model, perturbed, monkeypatch)
    rgb, cond, pm_cond, target_pm = _image_slices()
    for k in (0, 2):  # other views, RGB and point map: unchanged
        torch.testing.assert_close(after[:, cond[k]], before[:, cond[k]], rtol=0, atol=1e-6)
        torch.testing.assert_close(after[:, pm_cond[k]], before[:, pm_cond[k]], rtol=0, atol=1e-6)
    for changed in (cond[1], pm_cond[1], rgb, target_pm):  # itself, its pair and the targets see it
        assert not torch.allclose(after[:, changed], before[:, changed])


@pytest.mark.parametrize("adapter", [REFERENCE, DOMAIN])
def test_routed_linear_adapter_changes_only_its_tokens(adapter, monkeypatch):
    model = make_model()
    for name, param in model.flux.named_parameters():
        if f"lora_B.{adapter}." in name:
            torch.nn.init.normal_(param, std=0.1)
    calls = []
    original = transformer.routed_linear

    def recording(layer, x, routes):
        out = original(layer, x, routes)
        if x.shape[1] > 5:  # token inputs, not the 4-5 modulation kinds
            calls.append((layer, x.detach(), out.detach()))
        return out

    monkeypatch.setattr(transformer, "routed_linear", recording)
    with torch.no_grad():
        forward(model, make_batch())
    rgb, cond, pm_cond, target_pm = _image_slices()
    image = torch.zeros(LT + 2 * VIEWS * LC + LT, dtype=torch.bool)
    if adapter == REFERENCE:
        image[LT : LT + 2 * VIEWS * LC] = True
    else:
        image[pm_cond[0].start :] = True
    assert len(calls) >= 10
    with torch.no_grad():
        for layer, x, out in calls:
            changed = (out - layer.base_layer(x)).abs().amax(dim=(0, 2)) > 0
            expected = (
                image if x.shape[1] == image.numel() else torch.cat([torch.zeros(5, dtype=bool), image])
            )
            assert torch.equal(changed, expected), layer


def test_group_embeddings_per_group_timesteps_and_domains():
    model = make_model()
    torch.nn.init.normal_(model.domain_switcher.linear_2.weight, std=0.1)
    pooled = torch.randn(BATCH, 32)
    t = torch.tensor([0.2, 0.7])
    emb = model.group_embeddings(t, torch.ones(BATCH), pooled)
    flux = model.flux
    at_t = flux.time_text_embed(t * 1000, torch.ones(BATCH) * 1000, pooled)
    at_zero = flux.time_text_embed(torch.zeros(BATCH), torch.ones(BATCH) * 1000, pooled)
    rgb, pm = model.domain_switcher(torch.tensor([0, 1]))
    torch.testing.assert_close(emb[:, TEXT], at_t)
    torch.testing.assert_close(emb[:, TARGET_RGB], at_t + rgb)
    torch.testing.assert_close(emb[:, TARGET_POINT_MAP], at_t + pm)
    torch.testing.assert_close(emb[:, COND_RGB], at_zero + rgb)
    torch.testing.assert_close(emb[:, COND_POINT_MAP], at_zero + pm)


def test_double_block_forward_modulates_each_group_with_its_embedding(monkeypatch):
    model = make_model()
    batch = make_batch()
    base = _double_block_outputs(model, batch, monkeypatch)
    original = model.group_embeddings

    def shifted_text(*args):
        emb = original(*args).clone()
        emb[:, TEXT] += 1.0  # only the text group's modulation changes
        return emb

    monkeypatch.setattr(model, "group_embeddings", shifted_text)
    after = _double_block_outputs(model, batch, monkeypatch)
    rgb, cond, pm_cond, target_pm = _image_slices()
    # the text-agnostic target point map neither sees the text nor shares its modulation
    torch.testing.assert_close(after[:, target_pm], base[:, target_pm], rtol=0, atol=1e-6)
    for group in (rgb, cond[0], pm_cond[0]):  # groups that attend to the text see the change
        assert not torch.allclose(after[:, group], base[:, group])


def test_build_model_loads_pretrained_flux_directory(tmp_path):
    from refany3d.models.flux.components import save_tiny_flux_snapshot, tiny_flux

    save_tiny_flux_snapshot(tmp_path)
    flux = tiny_flux()
    model = build_model(ModelSettings(pretrained=str(tmp_path)))
    loaded = model.flux.state_dict()
    for name, value in flux.state_dict().items():
        peft_name = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        torch.testing.assert_close(loaded.get(name, loaded.get(peft_name)), value, rtol=0, atol=0)


def test_encode_conditions_cached_forward_equals_full_forward():
    model = make_model(independent_conditions=True)
    batch = make_batch()
    with torch.no_grad():
        for p in model.trainable_parameters():  # adapters and switcher non-zero: every route counts
            p.add_(0.05 * torch.randn_like(p))
        full = forward(model, batch)
        guidance = torch.ones(BATCH)
        cache = model.encode_conditions(
            batch.cond_rgb, batch.cond_point_map, COND_HW, TARGET_HW, batch.pooled, guidance
        )
        cached = model(
            target_rgb=batch.target_rgb,
            target_point_map=batch.target_point_map,
            encoder_hidden_states=batch.text,
            pooled_projections=batch.pooled,
            timestep=torch.full((BATCH,), 0.4),
            target_size=TARGET_HW,
            guidance=guidance,
            conditions=cache,
        )
    heads, head_dim = model.flux.config.num_attention_heads, model.flux.config.attention_head_dim
    assert len(cache.keys) == 2 and cache.keys[0].shape == (BATCH, 2 * VIEWS * LC, heads, head_dim)
    torch.testing.assert_close(cached.rgb, full.rgb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.point_map, full.point_map, rtol=1e-5, atol=1e-5)


def test_encode_conditions_needs_independent_conditions_off_by_default():
    assert ModelSettings().independent_conditions is False
    model = make_model()
    batch = make_batch()
    with pytest.raises(ValueError, match="independent_conditions"):
        model.encode_conditions(batch.cond_rgb, batch.cond_point_map, COND_HW, TARGET_HW, batch.pooled)
