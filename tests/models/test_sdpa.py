"""The SDPA kernel table (refany3d.models.sdpa): the nearest measured shape's kernel first, PyTorch's
order where nothing is measured (but never a per-shape planned kernel first for shapes that vary,
even where PyTorch's own order, as on Hopper, puts cuDNN first); the networks run inside the
context; on the CPU the fallback leaves every output as it was."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from refany3d.models import sdpa
from refany3d.models.mesher.hunyuan3d import Hunyuan3DMesher
from tests.models.mesher.test_hunyuan3d import _cutouts, _samples, _settings
from tests.models.mesher.test_hunyuan3d import weights as weights  # noqa: F401 - the fixture

GPU = ("NVIDIA H200", (9, 0))


def _row(queries, keys, best, head_dim=64, dtype="float16", backward=False, device=GPU):
    return {"device": device[0], "capability": list(device[1]), "head_dim": head_dim, "dtype": dtype,
            "backward": backward, "queries": queries, "keys": keys, "best": best}  # fmt: skip


ROWS = (
    _row(4442, 4442, "flash"),
    _row(200000, 3072, "cudnn"),
    _row(18944, 18944, "cudnn", head_dim=128, dtype="bfloat16"),
    _row(18944, 18944, "flash", head_dim=128, dtype="bfloat16", backward=True),
    _row(577, 577, None),  # every kernel out of tolerance: not a choice
)


@pytest.mark.parametrize(
    ("shape", "kernel"),
    [
        ((64, "float16", 3072, 3072, False), "flash"),  # nearest: the DiT row
        ((64, "float16", 150000, 3072, False), "cudnn"),  # nearest: the dense decoder chunk
        ((128, "bfloat16", 20000, 20000, False), "cudnn"),
        ((128, "bfloat16", 20000, 20000, True), "flash"),  # the pass counts
        ((80, "float16", 4096, 4096, False), None),  # an unmeasured head dim
        ((64, "float32", 3072, 3072, False), None),  # an unmeasured dtype
    ],
)
def test_chosen_kernel_is_the_nearest_measured_shapes(shape, kernel):
    head_dim, dtype, q, k, backward = shape
    assert sdpa.chosen_kernel(ROWS, GPU, head_dim, dtype, q, k, backward) == kernel


def test_chosen_kernel_needs_the_same_device_and_capability():
    assert sdpa.chosen_kernel(ROWS, ("NVIDIA H200", (8, 0)), 64, "float16", 200000, 3072) is None
    assert sdpa.chosen_kernel(ROWS, ("NVIDIA A100", (9, 0)), 64, "float16", 200000, 3072) is None


def test_kernel_order_puts_the_choice_first_then_pytorchs_order():
    assert sdpa.kernel_order("cudnn") == ("cudnn", "flash", "efficient", "math")
    assert sdpa.kernel_order("efficient") == ("efficient", "flash", "math", "cudnn")
    assert sdpa.kernel_order(None) == sdpa.DEFAULT_ORDER


def test_default_order_is_pytorchs():
    names = {SDPBackend.FLASH_ATTENTION: "flash", SDPBackend.EFFICIENT_ATTENTION: "efficient",
             SDPBackend.MATH: "math", SDPBackend.CUDNN_ATTENTION: "cudnn"}  # fmt: skip
    order = [names[SDPBackend(p)] for p in torch._C._get_sdp_priority_order() if SDPBackend(p) in names]
    assert tuple(order) == sdpa.DEFAULT_ORDER


def _priority() -> list[int]:
    return list(torch._C._get_sdp_priority_order())


def test_attention_kernels_is_a_no_op_on_the_cpu():
    before = _priority()
    with sdpa.attention_kernels(64, torch.float16, 200000, 3072, "cpu"):
        assert _priority() == before


@pytest.fixture
def measured_here(monkeypatch, tmp_path):
    """This machine as a measured GPU: the table's rows name it, and its device key is GPU's."""
    monkeypatch.setattr(sdpa, "_device_key", lambda device: GPU)
    table = tmp_path / "sdpa_table.json"

    def install(rows):
        table.write_text(json.dumps({"rows": list(rows)}))
        sdpa._read_table.cache_clear()
        monkeypatch.setattr(sdpa, "TABLE", table)

    yield install
    sdpa._read_table.cache_clear()


@pytest.fixture
def cudnn_first_default():
    """PyTorch's own order as a Hopper process has it after its first SDPA call: cuDNN first."""
    before = _priority()
    torch._C._set_sdp_priority_order(
        [int(SDPBackend.CUDNN_ATTENTION), *(p for p in before if p != int(SDPBackend.CUDNN_ATTENTION))]
    )
    yield
    torch._C._set_sdp_priority_order(before)


FLASH, CUDNN = int(SDPBackend.FLASH_ATTENTION), int(SDPBackend.CUDNN_ATTENTION)


def test_attention_kernels_sets_the_tables_kernel_first(measured_here, cudnn_first_default):
    measured_here(ROWS)
    before = _priority()
    with sdpa.attention_kernels(64, torch.float16, 200000, 3072, "cuda"):
        assert _priority()[0] == CUDNN
    assert _priority() == before
    with sdpa.attention_kernels(64, torch.float16, 4442, 4442, "cuda"):  # flash, not PyTorch's cuDNN
        assert _priority()[:2] == [FLASH, int(SDPBackend.EFFICIENT_ATTENTION)]
    assert _priority() == before
    with sdpa.attention_kernels(80, torch.float16, 4096, 4096, "cuda"):  # unmeasured, fixed: PyTorch's
        assert _priority() == before


def test_shapes_that_vary_never_put_a_per_shape_planned_kernel_first(measured_here, cudnn_first_default):
    measured_here([*ROWS, _row(32, 32, "efficient", head_dim=16)])
    with sdpa.attention_kernels(64, torch.float16, 200000, 3072, "cuda", shapes_vary=True):
        assert _priority()[0] == FLASH and _priority()[-2] == CUDNN  # the table says cuDNN
    with sdpa.attention_kernels(80, torch.float16, 4096, 4096, "cuda", shapes_vary=True):
        assert _priority()[0] == FLASH  # unmeasured: not PyTorch's cuDNN-first order either
    with sdpa.attention_kernels(16, torch.float16, 32, 32, "cuda", shapes_vary=True):
        assert _priority()[0] == int(SDPBackend.EFFICIENT_ATTENTION)  # no plans: still the table's


def test_the_fallback_on_the_cpu_gives_the_same_attention():
    q, k, v = (torch.randn(2, 4, 50, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    plain = F.scaled_dot_product_attention(q, k, v)
    with sdpa.sdpa_order(sdpa.kernel_order("cudnn")):  # cuDNN refuses the CPU: the next kernel runs
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), plain)


def _tiny_rows(mesher: Hunyuan3DMesher) -> tuple[dict, ...]:
    """Rows that make cuDNN the choice for the tiny DiT's and decoder's shapes."""
    from refany3d.models.mesher.hunyuan3d import _head_dim

    latents = mesher.pipe.vae.latent_shape[0]
    dit, decoder = _head_dim(mesher.pipe.model), _head_dim(mesher.pipe.vae.geo_decoder)
    return (
        _row(latents, latents, "cudnn", dit, "float32"),
        _row(10**5, latents, "cudnn", decoder, "float32"),
    )


def test_hunyuan3d_runs_its_dit_and_decoder_in_the_tables_context_with_equal_meshes(
    weights,  # noqa: F811
    measured_here,
):
    settings = _settings(weights)
    m = settings.mesher
    mesher = Hunyuan3DMesher(m.weights, dit=m.dit, flashvdm=m.flashvdm, mc_algo=m.mc_algo)
    seen = {}

    def first_kernel(name):
        def hook(*_):
            seen.setdefault(name, _priority()[0])  # the first kernel SDPA tries in this forward

        return hook

    for name, module in (("dit", mesher.pipe.model), ("decoder", mesher.pipe.vae.geo_decoder)):
        module.register_forward_pre_hook(first_kernel(name))
    deadline = time.monotonic() + 300
    plain = mesher.generate(_cutouts(1), _samples(1), m, 0, deadline)
    assert seen == {"dit": int(SDPBackend.FLASH_ATTENTION), "decoder": int(SDPBackend.FLASH_ATTENTION)}
    seen.clear()
    measured_here(_tiny_rows(mesher))
    chosen = mesher.generate(_cutouts(1), _samples(1), m, 0, deadline)
    assert seen == {"dit": int(SDPBackend.CUDNN_ATTENTION), "decoder": int(SDPBackend.CUDNN_ATTENTION)}
    # on the CPU cuDNN refuses and the next kernel runs: the same mesh
    assert np.array_equal(plain[0].vertices, chosen[0].vertices)
    assert np.array_equal(plain[0].faces, chosen[0].faces)


def test_hunyuan3d_flashvdm_decodes_its_ragged_chunks_with_flash_unmeasured_or_where_the_table_says_cudnn(
    weights,  # noqa: F811
    measured_here,
    cudnn_first_default,
):
    settings = _settings(weights, **{"mesher.flashvdm": True})
    m = settings.mesher
    mesher = Hunyuan3DMesher(m.weights, dit=m.dit, flashvdm=m.flashvdm, mc_algo=m.mc_algo)
    first = set()
    mesher.pipe.vae.geo_decoder.register_forward_pre_hook(lambda *_: first.add(_priority()[0]))
    measured_here(())  # a card the table does not cover (the H100 of runs 7 and 8)
    mesher.generate(_cutouts(1), _samples(1), m, 0, time.monotonic() + 300)
    assert first == {FLASH}
    measured_here(_tiny_rows(mesher))
    with mesher.dit_kernels():
        assert _priority()[0] == CUDNN  # the DiT's shapes are fixed
    first.clear()
    mesher.generate(_cutouts(1), _samples(1), m, 0, time.monotonic() + 300)
    assert first == {FLASH}


def test_depth_pro_runs_its_encoders_in_the_tables_context(tmp_path, measured_here):
    from PIL import Image

    from refany3d.models.depth import DepthProEstimator
    from refany3d.testing.checkpoints import tiny_depth_pro

    estimator = DepthProEstimator(str(tiny_depth_pro(tmp_path / "model")))
    vit = estimator.model.config.patch_model_config
    tokens = (vit.image_size // vit.patch_size) ** 2 + 1
    measured_here([_row(tokens, tokens, "cudnn", vit.hidden_size // vit.num_attention_heads, "float32")])
    seen = []
    estimator.model.register_forward_pre_hook(lambda *_: seen.append(_priority()[0]) and None)
    image = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    estimator.estimate([image], _samples(1), None, 0)
    assert seen == [int(SDPBackend.CUDNN_ATTENTION)]


def test_sampling_runs_the_denoising_in_the_tables_context(measured_here):
    from refany3d.models.flux import sampler
    from refany3d.sampling import RefAny3DPipeline
    from tests.sampling.test_pipeline import _colored_box
    from tests.sampling.test_pipeline_api import CHOSEN

    pipe = RefAny3DPipeline.from_pretrained(settings=CHOSEN)
    seen = []
    pipe.components.transformer.register_forward_pre_hook(lambda *_: seen.append(_priority()[0]) and None)
    real = sampler.attention_kernels

    def measured(head_dim, dtype, queries, keys, device, backward=False):
        measured_here([_row(queries, keys, "cudnn", head_dim, str(dtype).removeprefix("torch."))])
        return real(head_dim, dtype, queries, keys, device, backward)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampler, "attention_kernels", measured)
        pipe(_colored_box(), "a red box", num_inference_steps=1)
    assert seen and set(seen) == {int(SDPBackend.CUDNN_ATTENTION)}
