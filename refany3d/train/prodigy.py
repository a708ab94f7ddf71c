"""Prodigy with `torch._foreach_*` arithmetic: prodigyopt's update, one host sync per step.

`prodigyopt.Prodigy.step` walks the parameters one at a time and calls `.item()` twice for each
(the D-estimate's numerator and denominator), so a step over RefAny3D's ~1,400 adapter tensors waits
on the GPU ~2,800 times (0.35 s per step more than fused AdamW on an H200, issue #26). `FusedProdigy`
is the same optimizer (subclass: constructor, defaults, param-group keys and per-parameter state are
prodigyopt's, so its checkpoints load in either) whose step

- updates the EMAs, the D-estimate's `s` and the parameters with `_foreach` kernels per group,
- computes every per-parameter dot product (`torch.dot`) and L1 norm of `s` (`abs().sum()`) on the
  device with prodigyopt's own reductions, and reads them all back in one transfer,
- sums them on the host in prodigyopt's order, in double precision, so `d` follows the same
  arithmetic.

Equality (tests/train/test_prodigy.py): over 30 steps on fp32 parameters, with weight decay, bias
correction and safeguard warm-up, parameters and `d` equal prodigyopt 1.1.2's to the last bit on
the CPU. Stated tolerance on CUDA, whose `_foreach` kernels may round a multiply-add differently
from the per-tensor ones: rtol 1e-5 on the parameters and on `d`.

The sharded case (`fsdp_in_use`) is handed to prodigyopt's own step.
"""

from __future__ import annotations

import math

import torch
from prodigyopt import Prodigy


class FusedProdigy(Prodigy):
    """`prodigyopt.Prodigy` with a fused step (see the module doc); same arguments."""

    @torch.no_grad()
    def step(self, closure=None):
        if any(g["fsdp_in_use"] for g in self.param_groups) or any(
            hasattr(p, "_fsdp_flattened") for g in self.param_groups for p in g["params"]
        ):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        beta3 = first["beta3"] if first["beta3"] is not None else math.sqrt(beta2)
        k, d, d_max, d_coef = first["k"], first["d"], first["d_max"], first["d_coef"]
        lr = max(g["lr"] for g in self.param_groups)
        bias_correction = (
            (1 - beta2 ** (k + 1)) ** 0.5 / (1 - beta1 ** (k + 1)) if first["use_bias_correction"] else 1
        )
        dlr = d * lr * bias_correction
        d_numerator = first["d_numerator"] * beta3

        # per group: (params with grads, their state lists); device-side dots and L1 norms
        groups, dots, factors, l1s = [], [], [], []
        for group in self.param_groups:
            if group["lr"] not in (lr, 0.0):
                raise RuntimeError(
                    "Setting different lr values in different parameter groups is only supported for values of 0"
                )
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                groups.append((group, params))
                continue
            grads = [p.grad for p in params]
            decay, slice_p = group["weight_decay"], group["slice_p"]
            if decay != 0 and not group["decouple"]:
                torch._foreach_add_(grads, params, alpha=decay)
            states = [self._state(p, slice_p, beta1) for p in params]
            groups.append((group, params))
            if group["lr"] <= 0.0:
                continue
            d0 = group["d0"]
            flat = [p.flatten()[::slice_p] for p in params]
            sliced = [g.flatten()[::slice_p] for g in grads]
            dots.extend(
                torch.dot(g, (s["p0"] - x) if s["p0"].dim() else -x) for g, s, x in zip(sliced, states, flat)
            )
            factors.extend([(d / d0) * dlr] * len(params))
            if beta1 > 0:
                exp_avg = [s["exp_avg"] for s in states]
                torch._foreach_mul_(exp_avg, beta1)
                torch._foreach_add_(exp_avg, grads, alpha=d * (1 - beta1))
            exp_avg_sq = [s["exp_avg_sq"] for s in states]
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=d * d * (1 - beta2))
            s_list = [s["s"] for s in states]
            torch._foreach_mul_(s_list, beta3)
            alpha = (d / d0) * d if group["safeguard_warmup"] else (d / d0) * dlr
            torch._foreach_add_(s_list, sliced, alpha=alpha)
            l1s.extend(t.sum() for t in torch._foreach_abs(s_list))  # prodigyopt's s.abs().sum()

        # the one host sync: every dot and L1 norm, summed in prodigyopt's order in double
        values = torch.stack([*dots, *l1s]).tolist() if dots else []
        delta_numerator = 0.0
        for factor, dot in zip(factors, values[: len(dots)]):
            delta_numerator += factor * dot
        d_denom = 0.0
        for l1 in values[len(dots) :]:
            d_denom += l1
        if d_denom == 0:
            return loss

        global_d_numerator, global_d_denom = d_numerator + delta_numerator, d_denom
        d_hat = d
        if lr > 0.0:
            d_hat = d_coef * global_d_numerator / global_d_denom
            if d == first["d0"]:
                d = max(d, d_hat)
            d_max = max(d_max, d_hat)
            d = min(d_max, d * first["growth_rate"])

        for group, params in groups:
            group.update(
                d_numerator=global_d_numerator, d_denom=global_d_denom, d=d, d_max=d_max, d_hat=d_hat
            )
            if params:
                self._apply_update(group, params, dlr, d, beta1)
            group["k"] = group["k"] + 1
        return loss

    def _state(self, p: torch.Tensor, slice_p: int, beta1: float) -> dict:
        """prodigyopt's per-parameter state, created as its first step does."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["s"] = torch.zeros_like(p.flatten()[::slice_p]).detach()
            if p.any():
                state["p0"] = p.flatten()[::slice_p].detach().clone()
            else:  # all zeros (LoRA B at init): a 0-dim zero, as prodigyopt saves memory
                state["p0"] = torch.tensor(0, device=p.device, dtype=p.dtype)
            if beta1 > 0:
                state["exp_avg"] = torch.zeros_like(p).detach()
            state["exp_avg_sq"] = torch.zeros_like(p).detach()
        return state

    def _apply_update(self, group: dict, params: list, dlr: float, d: float, beta1: float) -> None:
        states = [self.state[p] for p in params]
        for s in states:
            s["step"] += 1
        denom = torch._foreach_sqrt([s["exp_avg_sq"] for s in states])
        torch._foreach_add_(denom, d * group["eps"])
        decay = group["weight_decay"]
        if decay != 0 and group["decouple"]:
            torch._foreach_add_(params, params, alpha=-decay * dlr)
        if beta1 > 0:
            torch._foreach_addcdiv_(params, [s["exp_avg"] for s in states], denom, value=-dlr)
        else:
            torch._foreach_addcdiv_(params, [p.grad for p in params], denom, value=-dlr * d)
