"""The FLUX.1-dev components: a snapshot-layout directory saved from tiny configs loads back through
`load_components`, missing parts fail naming `model.pretrained`, and the encoders follow FluxPipeline."""

from __future__ import annotations

import shutil

import pytest
import torch

from refany3d.config import ModelSettings
from refany3d.models.flux.components import (
    TINY_LABEL,
    decode_latents,
    encode_images,
    encode_prompts,
    load_components,
    pack_latents,
    save_tiny_flux_snapshot,
    unpack_latents,
)
from refany3d.models.weights import WeightsError


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return save_tiny_flux_snapshot(tmp_path_factory.mktemp("flux-dev"))


def test_save_tiny_flux_snapshot_has_the_published_layout(snapshot):
    index = (snapshot / "model_index.json").read_text()
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert f'"{part}"' in index and (snapshot / part).is_dir()
    assert (snapshot / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (snapshot / "text_encoder_2" / "model.safetensors").is_file()
    assert (snapshot / "scheduler" / "scheduler_config.json").is_file()


def test_load_components_pretrained_directory_equals_embedded_default(snapshot):
    tiny = load_components(ModelSettings(attention="grouped"))
    loaded = load_components(ModelSettings(pretrained=str(snapshot), attention="grouped", text_tokens=16))
    assert tiny.label == TINY_LABEL and loaded.label.startswith("FLUX.1-dev from") and not loaded.tiny
    assert tiny.identity != loaded.identity
    for name in ("vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    prompts = ["a red mug on a table", ""]
    for x, y in zip(encode_prompts(tiny, prompts), encode_prompts(loaded, prompts)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert type(loaded.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert loaded.scheduler.config.use_dynamic_shifting


@pytest.mark.parametrize("part", ["transformer", "text_encoder_2", "tokenizer", "model_index.json"])
def test_load_components_incomplete_snapshot_names_the_setting(snapshot, tmp_path, part):
    broken = tmp_path / "flux"
    shutil.copytree(snapshot, broken)
    target = broken / part
    if target.is_dir():  # weights gone (or, for a tokenizer, the whole folder's files)
        victims = [f for f in target.iterdir() if f.name.endswith(".safetensors")] or list(target.iterdir())
        for f in victims:
            f.unlink()
    else:
        target.unlink()
    with pytest.raises(WeightsError, match=r"^model\.pretrained: .*missing"):
        load_components(ModelSettings(pretrained=str(broken)))


def test_load_components_unknown_directory_names_the_setting(tmp_path):
    with pytest.raises(WeightsError, match=r"^model\.pretrained: "):
        load_components(ModelSettings(pretrained=str(tmp_path / "nope")))


def test_encode_images_packs_shifted_scaled_vae_latents():
    comps = load_components(ModelSettings(attention="grouped"))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = encode_images(comps, images)
    assert tokens.shape == (2, 4, 64)  # 32 px / 8 (VAE) / 2 (packing) = 2 x 2 tokens of 4 * 16
    z = comps.vae.encode(images).latent_dist.mean
    expected = (z - 0.1159) * 0.3611
    torch.testing.assert_close(unpack_latents(tokens, (2, 2)), expected)
    # packing is FluxPipeline's: channel-major within each 2x2 patch
    torch.testing.assert_close(tokens[0, 0].view(16, 2, 2), expected[0, :, :2, :2])
    assert decode_latents(comps, tokens, (2, 2)).shape == (2, 3, 32, 32)


def test_pack_latents_unpack_latents_round_trip():
    z = torch.randn(2, 16, 6, 4)
    torch.testing.assert_close(unpack_latents(pack_latents(z), (3, 2)), z, rtol=0, atol=0)


def test_encode_prompts_shapes_and_text_changes_both():
    comps = load_components(ModelSettings(attention="grouped"))
    text, pooled = encode_prompts(comps, ["a chair", "a lamp"])
    assert text.shape == (2, 16, 32) and pooled.shape == (2, 32)
    assert not torch.allclose(text[0], text[1]) and not torch.allclose(pooled[0], pooled[1])
    ids = comps.tokenizer(["ab"]).input_ids[0]
    assert comps.tokenizer.convert_ids_to_tokens(ids) == ["<s>", "a", "##b", "</s>"]
