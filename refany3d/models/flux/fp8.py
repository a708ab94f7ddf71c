"""FP8 frozen base linears (`model.fp8_base`): e4m3 weights quantised once, activations per call.

The Flux base is frozen, so each of its linears runs two GEMMs per training step: the forward and
the gradient of its input. `Float8Linear` runs both in FP8 through `torch._scaled_mm` (DESIGN §4:
1.44-1.62x bf16 at the Flux shapes and 18,944 tokens, the activation cast included):

- weight: quantised once, at conversion, to e4m3 with one scale per tensor (amax / 448). One
  per-tensor scale serves both GEMMs: the backward contracts over the output axis, where per-row
  scales of the forward could not be factored out of the sum (it would need a second, transposed
  quantisation). The bf16 weight is dropped: 1 byte per weight instead of 2.
- activation (forward, e4m3) and output gradient (backward, e5m2 for its range, as torchao does):
  one dynamic scale per call (amax of the tensor).
- backward: only the grad-input GEMM. A frozen weight needs no weight gradient, so the input is
  not even saved for backward (torchao's `Float8Linear` computes the weight-gradient GEMM anyway
  unless compile removes it).
- output and bias: in the input's dtype (bf16 in training).

The quantised weight and its scale are stored as integer bit patterns (uint8 / int32 views of the
e4m3 and fp32 tensors) so that `Module.to(dtype)` leaves them as they are; they are frozen
parameters (not buffers), which DDP does not re-broadcast at every forward.

`convert_base_to_float8(flux)` swaps the frozen token linears of the double and single blocks in
place, after the peft adapters were injected: a LoRA layer keeps its adapters and gets a
`Float8Linear` as its `base_layer` (peft itself never sees an FP8 weight, so it cannot cast the
adapters to it). The order matters: `Float8Linear` is no `nn.Linear`, so peft refuses to inject
into an already converted layer; adapters still save and load in the peft format (their state
dict holds only the `lora_` tensors). The AdaLN modulation linears (`norm*.linear`: one row per sample and token kind,
nothing to gain) and the embedders / output projection outside the blocks stay as they were.

Why our own module and not torchao's `convert_to_float8_training`: torchao is not in the GPU
machine's image (device KINDS.md), and its `Float8Linear` computes the weight-gradient GEMM of a
frozen weight unless compile removes it (DESIGN §4).

FP8 GEMMs need CUDA compute capability >= 8.9 (Ada, Hopper and later). `float8_unsupported(device)`
says why a device cannot run them; the model then keeps its bf16 base and logs that line
(transformer.py). `emulate=True` runs the same quantisation with the GEMM in fp32 on dequantised
values (quantise -> dequantise -> matmul): the CPU reference of the math, for tests.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
_AMAX_FLOOR = 1e-12  # an all-zero tensor gets a finite scale (its values quantise to 0 either way)


def float8_unsupported(device: torch.device | str) -> str | None:
    """Why `device` cannot run `torch._scaled_mm` e4m3 GEMMs, or None where it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"FP8 GEMMs need CUDA with compute capability >= 8.9; the device is {device.type}"
    if not torch.cuda.is_available():
        return "FP8 GEMMs need CUDA; this machine has none"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"FP8 GEMMs need CUDA compute capability >= 8.9; {name} has {major}.{minor}"
    if not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no torch._scaled_mm"
    return None


def quantise(t: torch.Tensor, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): t ~= q.float() * scale with one fp32 scale for the whole tensor (amax / max)."""
    fmax = torch.finfo(dtype).max
    scale = t.detach().abs().amax().float().clamp(min=_AMAX_FLOOR) / fmax
    q = (t.float() / scale).clamp(-fmax, fmax).to(dtype)
    return q, scale


def _scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    fast_accum: bool,
    emulate: bool,
) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) + bias in `out_dtype`; a (M, K) row-major, b (K, N)
    column-major, both FP8."""
    if emulate:
        out = (a.float() * scale_a) @ (b.float() * scale_b)
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype)
    return torch._scaled_mm(
        a,
        b,
        scale_a=scale_a,
        scale_b=scale_b,
        bias=None if bias is None else bias.to(out_dtype),
        out_dtype=out_dtype,
        use_fast_accum=fast_accum,
    )


class _Float8Matmul(torch.autograd.Function):
    """y = x W^T + b with x and W in FP8; backward: the input's gradient alone."""

    # x (M, K) rows in and (M, N) out: the caller reshapes, so that the output is no view made
    # inside the Function (routed_linear adds the LoRA in place on slices of it)

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, emulate):
        xq, x_scale = quantise(x, E4M3)
        # weight (N, K) row-major: its transpose is the (K, N) column-major operand
        out = _scaled_mm(xq, weight.t(), x_scale, weight_scale, bias, x.dtype, True, emulate)
        ctx.save_for_backward(weight, weight_scale)
        ctx.emulate = emulate
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, weight_scale = ctx.saved_tensors
        gq, g_scale = quantise(grad_out.contiguous(), E5M2)
        # grad_x (M, K) = grad_out (M, N) @ W (N, K); W as column-major: a transposed copy (1 byte
        # per weight, memory-bound: ~1% of the GEMM at 18,944 tokens) instead of a second stored one
        w_col = weight.t().contiguous().t()
        grad_x = _scaled_mm(gq, w_col, g_scale, weight_scale, None, grad_out.dtype, False, ctx.emulate)
        return grad_x, None, None, None, None


class Float8Linear(nn.Module):
    """A frozen `nn.Linear` whose forward and grad-input GEMMs run in FP8 (see the module doc).

    Args:
        weight: (out_features, in_features) frozen weight, quantised here to e4m3 (per tensor).
        bias: (out_features,) or None, kept in its dtype.
        emulate: dequantise and multiply in fp32 instead of `torch._scaled_mm` (CPU reference).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, emulate: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scale = quantise(weight.detach(), E4M3)
        self.weight_bits = nn.Parameter(q.view(torch.uint8), requires_grad=False)
        self.scale_bits = nn.Parameter(scale.reshape(()).view(torch.int32), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.emulate = emulate

    @classmethod
    def from_linear(cls, linear: nn.Linear, emulate: bool = False) -> Float8Linear:
        if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
            raise ValueError("Float8Linear is for frozen linears: this one's weight trains")
        return cls(linear.weight, linear.bias, emulate)

    @property
    def weight_fp8(self) -> torch.Tensor:
        return self.weight_bits.view(E4M3)

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.scale_bits.view(torch.float32)

    def dequantised_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight_fp8.float() * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = _Float8Matmul.apply(rows, self.weight_fp8, self.weight_scale, self.bias, self.emulate)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        mode = ", emulate" if self.emulate else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 per tensor{mode}"


def _convertible(name: str, linear: nn.Linear) -> bool:
    """A frozen token linear of a block: not a modulation linear, not an adapter, FP8-GEMM-sized."""
    leaf = name.rsplit(".", 1)[-1]
    if "lora_" in name or ".norm" in f".{name}" or leaf.startswith("norm"):
        return False
    if linear.weight.requires_grad:
        return False
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0  # _scaled_mm's layout rule


def convert_base_to_float8(flux: nn.Module, emulate: bool = False) -> list[str]:
    """Swap the frozen token linears of `flux`'s double and single blocks for `Float8Linear`, in
    place (after the peft adapters were injected); returns the converted module names."""
    from peft.tuners.lora import LoraLayer

    converted = []
    for prefix in ("transformer_blocks", "single_transformer_blocks"):
        blocks = getattr(flux, prefix)
        for name, module in list(blocks.named_modules()):
            if isinstance(module, LoraLayer) and isinstance(module.base_layer, nn.Linear):
                owner, attr, linear = module, "base_layer", module.base_layer
            elif isinstance(module, nn.Linear) and not _inside_lora(blocks, name):
                parent, _, attr = name.rpartition(".")
                owner, linear = blocks.get_submodule(parent), module
            else:
                continue
            if _convertible(name, linear):
                setattr(owner, attr, Float8Linear.from_linear(linear, emulate))
                converted.append(f"{prefix}.{name}")
    return converted


def _inside_lora(root: nn.Module, name: str) -> bool:
    """`name` is a LoRA layer's base layer or one of its adapters (handled with the LoRA layer)."""
    from peft.tuners.lora import LoraLayer

    parts = name.split(".")
    return any(isinstance(root.get_submodule(".".join(parts[:i])), LoraLayer) for i in range(1, len(parts)))
