"""FP8 frozen base linears (fp8.py): the emulated math on the CPU, the grad-input-only backward,
peft adapters over converted layers, the CPU fallback, and `torch._scaled_mm` where CUDA has it.

Tolerances (stated before measuring; e4m3 keeps 3 mantissa bits, e5m2 2): a converted linear's
output is within 8% (relative Frobenius error) of the bf16/fp32 linear, its input gradient within
15%; the CUDA kernel agrees with the emulation within 2% (accumulation order and fast accumulation)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch.utils.flop_counter import FlopCounterMode

from refany3d.models.flux import fp8
from refany3d.models.flux.fp8 import Float8Linear, convert_base_to_float8, quantise

from .conftest import forward, make_model

OUT_RTOL, GRAD_RTOL, KERNEL_RTOL = 0.08, 0.15, 0.02


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def _linear(seed: int = 0, k: int = 128, n: int = 96) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n).requires_grad_(False)


def test_quantise_round_trip_keeps_amax_and_e4m3_resolution():
    t = torch.randn(64, 32) * 7
    q, scale = quantise(t)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    back = q.float() * scale
    assert torch.isclose(back.abs().max(), t.abs().max(), rtol=1e-6)  # amax maps to 448 exactly
    assert float(((back - t).abs() / t.abs().clamp(min=scale * 2**-6)).max()) <= 2**-4 + 1e-6


def test_float8_linear_emulated_matches_linear_within_tolerance():
    linear = _linear()
    f8 = Float8Linear.from_linear(linear, emulate=True)
    x = torch.randn(3, 40, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = f8(x), linear(x_ref)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert 0 < _rel(out, ref) < OUT_RTOL
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    assert 0 < _rel(x.grad, x_ref.grad) < GRAD_RTOL
    # exactly the quantise -> dequantise -> matmul of the module doc
    xq, xs = quantise(x.detach().reshape(-1, 128))
    manual = (xq.float() * xs) @ f8.dequantised_weight().t() + linear.bias
    torch.testing.assert_close(out.detach().reshape(-1, 96), manual, rtol=0, atol=0)


def test_float8_linear_bf16_input_gives_bf16_output():
    f8 = Float8Linear.from_linear(_linear().to(torch.bfloat16), emulate=True)
    x = torch.randn(2, 16, 128, dtype=torch.bfloat16)
    assert f8(x).dtype == torch.bfloat16
    assert f8.bias.dtype == torch.bfloat16 and f8.weight_fp8.dtype == torch.float8_e4m3fn


def test_float8_linear_backward_computes_only_the_grad_input_gemm():
    f8 = Float8Linear.from_linear(_linear(), emulate=True)
    m, k, n = 50, 128, 96
    x = torch.randn(m, k, requires_grad=True)
    out = f8(x)
    with FlopCounterMode(display=False) as counter:
        out.backward(torch.randn_like(out))
    assert counter.get_total_flops() == 2 * m * n * k  # grad_x only; a weight grad would double it
    assert all(p.grad is None for p in f8.parameters())
    assert not any(p.requires_grad for p in f8.parameters())


def test_float8_linear_keeps_its_dtypes_through_module_to():
    f8 = Float8Linear.from_linear(_linear(), emulate=True)
    before = f8.dequantised_weight()
    f8.to(torch.bfloat16)
    assert f8.weight_fp8.dtype == torch.float8_e4m3fn and f8.weight_scale.dtype == torch.float32
    torch.testing.assert_close(f8.dequantised_weight(), before, rtol=0, atol=0)
    assert f8.bias.dtype == torch.bfloat16


def test_float8_linear_refuses_a_trainable_weight():
    with pytest.raises(ValueError, match="frozen"):
        Float8Linear.from_linear(torch.nn.Linear(16, 16))


def _fp8_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]


def test_convert_base_to_float8_converts_token_linears_not_modulation_or_adapters(batch):
    model = make_model()
    names = convert_base_to_float8(model.flux, emulate=True)
    assert "transformer_blocks.0.attn.to_q" in names and "transformer_blocks.0.attn.add_k_proj" in names
    assert "transformer_blocks.0.ff.net.2" in names and "transformer_blocks.0.ff_context.net.2" in names
    assert "single_transformer_blocks.0.proj_mlp" in names and "single_transformer_blocks.0.proj_out" in names
    assert not [n for n in names if "norm" in n or "lora_" in n]
    assert len(_fp8_layers(model)) == len(names)
    q = model.flux.transformer_blocks[0].attn.to_q
    assert isinstance(q, LoraLayer) and isinstance(q.base_layer, Float8Linear)
    assert q.lora_A["reference"].weight.dtype == torch.float32
    assert not isinstance(model.flux.x_embedder.base_layer, Float8Linear)  # outside the blocks


def test_peft_adapters_over_float8_base_still_train(batch):
    ref_model, model = make_model(), make_model()
    convert_base_to_float8(model.flux, emulate=True)
    with torch.no_grad():  # the switcher's last layer is zero-init: open it so every part is used
        torch.nn.init.normal_(ref_model.domain_switcher.linear_2.weight, std=0.02)
    model.domain_switcher.load_state_dict(ref_model.domain_switcher.state_dict())
    out, ref = forward(model, batch), forward(ref_model, batch)
    assert 0 < _rel(out.rgb, ref.rgb) < OUT_RTOL and 0 < _rel(out.point_map, ref.point_map) < OUT_RTOL
    params = model.trainable_parameters()
    for o in (out, ref):
        (o.rgb.square().mean() + o.point_map.square().mean()).backward()

    def grads(m):  # the adapters that reach the targets (the last block's condition rows do not)
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    got, want = grads(model), grads(ref_model)
    assert got.keys() == want.keys() and any("lora_B" in n for n in got)
    flat = [torch.cat([g[n].flatten() for n in sorted(want)]) for g in (got, want)]
    assert _rel(*flat) < GRAD_RTOL
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    trained = {n: p for n, p in model.named_parameters() if n in got}
    before = {n: p.detach().clone() for n, p in trained.items()}
    torch.optim.AdamW(params, lr=1e-3).step()
    assert all(not torch.equal(before[n], p) for n, p in trained.items())


def test_fp8_base_on_cpu_falls_back_with_one_line(caplog):
    with caplog.at_level(logging.WARNING, logger="refany3d.models.flux"):
        model = make_model(fp8_base=True)
    assert model.fp8_base is False and not _fp8_layers(model)
    lines = [r.getMessage() for r in caplog.records if "model.fp8_base" in r.getMessage()]
    assert lines == [
        "model.fp8_base: FP8 GEMMs need CUDA with compute capability >= 8.9; the device is cpu; "
        "the frozen base stays in float32"
    ]


def test_float8_unsupported_names_the_device():
    assert "cpu" in fp8.float8_unsupported("cpu")
    assert make_model().fp8_base is False  # off by default


_FP8_CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not _FP8_CUDA, reason="needs CUDA with compute capability >= 8.9")
@pytest.mark.parametrize("compiled", [False, True])
def test_float8_linear_scaled_mm_agrees_with_emulation_on_cuda(compiled):
    linear = _linear(k=512, n=768).to("cuda", torch.bfloat16)
    kernel = Float8Linear.from_linear(linear)
    emulated = Float8Linear.from_linear(linear, emulate=True)
    x = torch.randn(4, 300, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x_emu = x.detach().clone().requires_grad_(True)
    fn = torch.compile(kernel) if compiled else kernel
    out, emu = fn(x), emulated(x_emu)
    assert out.dtype == torch.bfloat16 and _rel(out, emu) < KERNEL_RTOL
    assert _rel(out, F.linear(x.detach(), linear.weight, linear.bias)) < OUT_RTOL
    g = torch.randn_like(out)
    out.backward(g)
    emu.backward(g)
    assert _rel(x.grad, x_emu.grad) < KERNEL_RTOL


def test_float8_linear_traces_under_compile_with_in_place_lora_update():
    """Dynamo + AOTAutograd (aot_eager: no C++ toolchain needed) trace the FP8 Function, and the
    in-place LoRA add of routed_linear on a slice of its output works compiled and eager alike."""
    f8 = Float8Linear.from_linear(_linear(), emulate=True)

    def block(x):
        out = f8(x)
        out[:, 2:5].add_(x[:, 2:5, :96] * 0.5)  # as routed_linear's baddbmm_ on an adapter's slice
        return out.square().mean()

    x = torch.randn(2, 8, 128, requires_grad=True)
    x_compiled = x.detach().clone().requires_grad_(True)
    eager = block(x)
    eager.backward()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(x_compiled)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(x_compiled.grad, x.grad)


@pytest.mark.skipif(not _FP8_CUDA, reason="needs CUDA with compute capability >= 8.9")
def test_fp8_base_model_trains_with_compiled_blocks_and_flex_attention_on_cuda(batch):
    from refany3d.config import ModelSettings
    from refany3d.models.flux import build_model

    def model(fp8: bool):
        torch.manual_seed(0)
        settings = ModelSettings(
            attention="flex", compile_blocks=True, gradient_checkpointing=True, fp8_base=fp8
        )
        return build_model(settings, "cuda", torch.bfloat16)

    plain, f8 = model(False), model(True)
    assert f8.fp8_base and _fp8_layers(f8) and not _fp8_layers(plain)
    b = {k: v.to("cuda", torch.bfloat16) if torch.is_tensor(v) else v for k, v in vars(batch).items()}
    t = torch.full((b["target_rgb"].shape[0],), 0.4, device="cuda")
    outs = []
    for m in (plain, f8):
        out = m(
            target_rgb=b["target_rgb"],
            target_point_map=b["target_point_map"],
            encoder_hidden_states=b["text"],
            pooled_projections=b["pooled"],
            timestep=t,
            target_size=b["target_size"],
            cond_rgb=b["cond_rgb"],
            cond_point_map=b["cond_point_map"],
            cond_size=b["cond_size"],
            guidance=torch.ones_like(t),
        )
        (out.rgb.float().square().mean() + out.point_map.float().square().mean()).backward()
        outs.append(out)
    assert outs[1].rgb.dtype == torch.bfloat16
    assert _rel(outs[1].rgb, outs[0].rgb) < OUT_RTOL
    grads = [p.grad for n, p in f8.named_parameters() if "lora_B" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_adapters_trained_over_float8_base_save_and_load_in_peft_format(tmp_path, batch):
    from safetensors.torch import load_file

    from refany3d.models.flux import load_adapters, save_adapters
    from refany3d.models.flux.io import ADAPTER_WEIGHTS

    trained, fresh = make_model(), make_model()
    for m in (trained, fresh):
        convert_base_to_float8(m.flux, emulate=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trained.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_adapters(trained, tmp_path)
    keys = load_file(tmp_path / "reference" / ADAPTER_WEIGHTS).keys()
    assert keys and all("lora_" in k for k in keys)  # no FP8 base tensors in the adapter files
    load_adapters(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(forward(fresh, batch).rgb, forward(trained, batch).rgb, rtol=0, atol=0)
