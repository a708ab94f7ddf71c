import json

import pytest
import torch
from safetensors.torch import load_file

from refany3d.config import SettingsError
from refany3d.models.flux import load_adapters, save_adapters
from refany3d.models.flux.io import ADAPTER_WEIGHTS, SWITCHER_WEIGHTS

from .conftest import forward, make_batch, make_model


def _perturb(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=g))


def test_save_adapters_load_adapters_round_trip_gives_identical_outputs(tmp_path):
    trained = make_model(seed=0)
    _perturb(trained, seed=1)
    save_adapters(trained, tmp_path)
    fresh = make_model(seed=0)  # same base weights (FLUX.1-dev in practice), untrained adapters
    batch = make_batch()
    with torch.no_grad():
        before = forward(fresh, batch).rgb
        load_adapters(fresh, tmp_path)
        expected, loaded = forward(trained, batch), forward(fresh, batch)
    assert not torch.equal(before, expected.rgb)
    torch.testing.assert_close(loaded.rgb, expected.rgb, rtol=0, atol=0)
    torch.testing.assert_close(loaded.point_map, expected.point_map, rtol=0, atol=0)


def test_save_adapters_writes_standard_peft_files(tmp_path):
    model = make_model()
    save_adapters(model, tmp_path)
    for name in ("reference", "domain"):
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["peft_type"]) == (16, 16.0, "LORA")
        keys = load_file(tmp_path / name / ADAPTER_WEIGHTS).keys()
        assert "x_embedder.lora_A.weight" in keys
        assert "transformer_blocks.0.attn.to_q.lora_B.weight" in keys
        assert "single_transformer_blocks.0.proj_out.lora_A.weight" in keys
        assert not any(k.startswith("proj_out") or "ff.net.0" in k or "norm1_context" in k for k in keys)
    assert set(load_file(tmp_path / SWITCHER_WEIGHTS)) >= {"embedding.weight", "linear_2.weight"}


def test_load_adapters_other_rank_raises(tmp_path):
    save_adapters(make_model(lora_rank=4, lora_alpha=4.0), tmp_path)
    with pytest.raises(SettingsError, match="model.lora_rank"):
        load_adapters(make_model(), tmp_path)
