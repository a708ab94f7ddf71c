"""FusedProdigy (train/prodigy.py) against prodigyopt's Prodigy, step by step on the CPU.

On the CPU the fused step uses the same reductions and the same elementwise arithmetic as
prodigyopt, so the parameters and the D-estimate are equal to the last bit after each of 30 steps
(a looser tolerance let a dropped weight decay through: its effect is ~1e-7 of a weight per step).
The stated tolerance for other devices, whose `_foreach` kernels may round a multiply-add
differently, is rtol 1e-5 (prodigy.py)."""

from __future__ import annotations

import copy as copy_module

import pytest
import torch
from prodigyopt import Prodigy

from refany3d.config import OptimSettings
from refany3d.train.prodigy import FusedProdigy
from refany3d.train.trainer import build_optimizer

STEPS = 30
P_RTOL, P_ATOL = 0.0, 0.0  # bit-exact on the CPU (module doc)

# DESIGN §5's settings; d0 1e-4 (default 1e-6) so that the steps are large enough to tell apart
DESIGN = {"lr": 1.0, "weight_decay": 0.01, "use_bias_correction": True, "safeguard_warmup": True, "d0": 1e-4}
OTHER = {"lr": 0.7, "weight_decay": 0.05, "decouple": False, "betas": (0.0, 0.99), "d_coef": 2.0}


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    """LoRA-like tensors: gaussian A, zero B (prodigyopt keeps a 0-dim p0 for it), a bias, and one
    that gets no gradient."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 48), (48, 16), (33,), (7, 5, 3), (4, 4)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.02) for s in shapes]
    with torch.no_grad():
        params[1].zero_()
    return params


def _loss(params: list[torch.Tensor], step: int) -> torch.Tensor:
    """A quadratic towards a fixed target, with per-step noise (a minibatch): gradients depend on
    the parameters, so differences compound, and point one way, so Prodigy's d grows."""
    g, noise = torch.Generator().manual_seed(100), torch.Generator().manual_seed(200 + step)
    total = 0.0
    for p in params[:-1]:  # the last one gets no gradient
        target = torch.randn(p.shape, generator=g) + 0.3 * torch.randn(p.shape, generator=noise)
        weight = torch.rand(p.shape, generator=g)
        total = total + ((p - target.to(p.device)) ** 2 * weight.to(p.device)).sum()
    return total + (params[0] @ params[1]).square().sum()


def _run(cls, kwargs: dict, steps: int, params=None, state=None):
    params = params or _params()
    opt = cls(params, **kwargs)
    if state is not None:
        opt.load_state_dict(state)
    trace = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        _loss(params, step).backward()
        opt.step()
        trace.append(([p.detach().clone() for p in params], opt.param_groups[0]["d"]))
    return trace, opt


@pytest.mark.parametrize("kwargs", [DESIGN, OTHER], ids=["design", "coupled-no-beta1"])
def test_fused_prodigy_step_equals_prodigyopt(kwargs):
    want, ref = _run(Prodigy, kwargs, STEPS)
    got, fused = _run(FusedProdigy, kwargs, STEPS)
    for (wp, wd), (gp, gd) in zip(want, got):
        assert gd == wd
        for a, b in zip(gp, wp):
            torch.testing.assert_close(a, b, rtol=P_RTOL, atol=P_ATOL)
    assert want[-1][1] > 3 * want[0][1]  # d grew: the estimate is exercised, not stuck at d0
    assert not torch.equal(want[-1][0][1], torch.zeros(48, 16))
    for key in ("k", "d_max", "d_numerator", "d_hat"):
        assert fused.param_groups[0][key] == ref.param_groups[0][key]
    assert {k for s in fused.state.values() for k in s} == {k for s in ref.state.values() for k in s}


def test_fused_prodigy_state_resumes_in_prodigyopt():
    """Checkpoints (optimizer.pt) load in either implementation and go on alike."""
    params = _params()
    _, fused = _run(FusedProdigy, DESIGN, 5, params)
    state = fused.state_dict()
    copy = [p.detach().clone().requires_grad_(True) for p in params]
    want, _ = _run(Prodigy, DESIGN, 4, copy, copy_module.deepcopy(state))  # load_state_dict shares tensors
    got, _ = _run(FusedProdigy, DESIGN, 4, params, copy_module.deepcopy(state))
    for (wp, _), (gp, _) in zip(want, got):
        for a, b in zip(gp, wp):
            torch.testing.assert_close(a, b, rtol=P_RTOL, atol=P_ATOL)


def test_fused_prodigy_no_gradient_takes_no_step():
    params = _params()
    opt = FusedProdigy(params, **DESIGN)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, params)) and opt.param_groups[0]["k"] == 0


def test_build_optimizer_prodigy_is_fused_prodigyopt_is_the_library():
    params = _params()
    assert type(build_optimizer(params, OptimSettings(optimizer="prodigy"))) is FusedProdigy
    assert type(build_optimizer(params, OptimSettings(optimizer="prodigyopt"))) is Prodigy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_prodigy_step_equals_prodigyopt_on_cuda_within_tolerance():
    """The stated CUDA tolerance (prodigy.py): rtol 1e-5 on the parameters and on d."""

    def on_cuda():
        return [torch.nn.Parameter(p.detach().cuda()) for p in _params()]

    want, _ = _run(Prodigy, DESIGN, STEPS, on_cuda())
    got, _ = _run(FusedProdigy, DESIGN, STEPS, on_cuda())
    for (wp, wd), (gp, gd) in zip(want, got):
        assert gd == pytest.approx(wd, rel=1e-5)
        for a, b in zip(gp, wp):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
