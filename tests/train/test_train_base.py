"""`model.train_base`: every Flux weight trains with the adapters (a small model from scratch, the
learning check of bench/learn_bench.py), and the checkpoint holds the trained base beside them, so
a pipeline loaded from it is the trained model, not the adapters on the untrained base."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from refany3d.cli import main
from refany3d.config import ModelSettings, SettingsError, override
from refany3d.models.flux.io import BASE_WEIGHTS
from refany3d.sampling import RefAny3DPipeline
from tests.sampling.test_pipeline import SETTINGS, _colored_box
from tests.train.test_cli_train import TINY

BASE = override(SETTINGS, **{"model.train_base": True})


def test_train_base_with_an_fp8_base_is_refused_naming_both():
    with pytest.raises(SettingsError, match=r"model.train_base: .*model.fp8_base off"):
        ModelSettings(train_base=True, fp8_base=True)


def test_train_base_makes_every_flux_weight_trainable_and_only_then():
    frozen = RefAny3DPipeline.from_pretrained(settings=SETTINGS).components.transformer
    trained = RefAny3DPipeline.from_pretrained(settings=BASE).components.transformer
    assert all("lora_" in n for n, p in frozen.flux.named_parameters() if p.requires_grad)
    assert all(p.requires_grad for p in trained.flux.parameters())
    count = sum(p.numel() for p in trained.trainable_parameters())
    assert count == sum(p.numel() for p in trained.parameters())


def _moved(pipe: RefAny3DPipeline) -> RefAny3DPipeline:
    """`pipe` with every trainable weight moved off its initialisation (as if trained)."""
    transformer = copy.deepcopy(pipe.components.transformer)
    with torch.no_grad():
        for p in transformer.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    return RefAny3DPipeline(dataclasses.replace(pipe.components, transformer=transformer), pipe.settings)


def test_a_trained_base_travels_with_the_adapters_and_loads_back(tmp_path):
    trained = _moved(RefAny3DPipeline.from_pretrained(settings=BASE))
    exported = trained.save_pretrained(tmp_path / "refany3d")
    assert json.loads((exported / "config.json").read_text())["train_base"] is True
    assert "train_base" in (exported / "README.md").read_text()
    saved = load_file(exported / "adapters" / BASE_WEIGHTS)
    assert saved and not any("lora_" in k for k in saved)
    loaded = RefAny3DPipeline.from_pretrained(exported)  # the flag comes from config.json
    assert loaded.settings.model.train_base
    box = _colored_box()
    a = trained(box, "a red box", generator=torch.Generator().manual_seed(4))
    b = loaded(box, "a red box", generator=torch.Generator().manual_seed(4))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.point_map, b.point_map)


def test_a_train_base_checkpoint_without_its_base_fails_naming_the_setting(tmp_path):
    exported = _moved(RefAny3DPipeline.from_pretrained(settings=BASE)).save_pretrained(tmp_path / "r")
    (exported / "adapters" / BASE_WEIGHTS).unlink()
    with pytest.raises(SettingsError, match=rf"model.train_base: true, but .* holds no {BASE_WEIGHTS}"):
        RefAny3DPipeline.from_pretrained(exported)


def test_adapters_of_a_frozen_base_hold_no_base_weights(tmp_path):
    exported = _moved(RefAny3DPipeline.from_pretrained(settings=SETTINGS)).save_pretrained(tmp_path / "r")
    assert not (exported / "adapters" / BASE_WEIGHTS).exists()


def test_a_train_base_run_moves_the_base_and_its_checkpoint_holds_it(dataset, tmp_path):
    initial = RefAny3DPipeline.from_pretrained(settings=BASE).components.transformer.flux.state_dict()
    args = ["train", "--data", str(dataset), "--out", str(tmp_path / "run"), "--steps", "2"]
    extra = [
        f"--set=data.cache={tmp_path}/cache",
        "--set=model.train_base=true",
        "--set=optim.optimizer=adamw",
    ]
    assert main([*args, *TINY, *extra, "--set=optim.lr=0.001"]) == 0
    (step,) = (tmp_path / "run" / "checkpoints").glob("step-*")
    base = load_file(step / "adapters" / BASE_WEIGHTS)
    name = "transformer_blocks.0.ff.net.0.proj.weight"  # a base weight no adapter targets
    assert name in base and not torch.equal(base[name], initial[name].to(base[name].dtype))
