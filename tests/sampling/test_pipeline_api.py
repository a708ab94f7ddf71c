"""The diffusers-style surface of RefAny3DPipeline: from_pretrained / save_pretrained round trip,
torch_dtype and .to, generator / num_inference_steps / guidance_scale, height / width,
num_images_per_prompt and prompt lists, PIL outputs, and the refusals of adapters trained with
other flags or on other base weights."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from refany3d.config import SettingsError, override
from refany3d.sampling import RefAny3DPipeline
from refany3d.sampling.assets import render_conditions
from tests.sampling.test_pipeline import SETTINGS, _colored_box

# sampling defaults a caller chose: the round trip must carry them in config.json
CHOSEN = override(SETTINGS, **{"sampler.guidance": 2.5, "sampler.seed": 9})


@pytest.fixture(scope="module")
def pipe():
    return RefAny3DPipeline.from_pretrained(settings=CHOSEN)


@pytest.fixture(scope="module")
def trained(pipe):
    """The pipeline with adapters moved off their initialisation (as if trained)."""
    transformer = copy.deepcopy(pipe.components.transformer)
    with torch.no_grad():
        for p in transformer.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return RefAny3DPipeline(dataclasses.replace(pipe.components, transformer=transformer), pipe.settings)


@pytest.fixture(scope="module")
def box():
    return _colored_box()


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    return trained.save_pretrained(tmp_path_factory.mktemp("export") / "refany3d")


def test_save_pretrained_round_trip_gives_identical_outputs_for_a_seed(trained, pipe, exported, box):
    loaded = RefAny3DPipeline.from_pretrained(exported)  # nothing passed: all from the directory
    # resolution, steps, guidance, image guidance (the seed is per call, as in diffusers)
    assert dataclasses.replace(loaded.settings.sampler, seed=9) == trained.settings.sampler
    assert loaded.settings.render.views == 2 and loaded.source["checkpoint"] == str(exported)
    a = trained(box, "a red box", generator=torch.Generator().manual_seed(4))
    b = loaded(box, "a red box", generator=torch.Generator().manual_seed(4))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.point_map, b.point_map)
    assert not np.array_equal(a.image, pipe(box, "a red box", seed=4).image)  # the adapters matter
    files = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()}
    assert {"config.json", "README.md", "manifest.json", "adapters/reference/adapter_config.json"} <= files
    card = (exported / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card


def test_call_takes_generator_steps_and_guidance_as_diffusers_pipelines(pipe, box):
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0}
    a = pipe(box, "a red box", generator=torch.Generator().manual_seed(7), **kwargs)
    same = RefAny3DPipeline(
        pipe.components,
        override(CHOSEN, **{"sampler.steps": 3, "sampler.guidance": 2.0, "sampler.seed": 7}),
    )(box, "a red box")
    assert np.array_equal(a.image, same.image) and np.array_equal(a.point_map, same.point_map)
    assert a.seed == 7 and a.provenance["settings"]["sampler"]["steps"] == 3
    assert a.provenance["settings"]["sampler"]["guidance"] == 2.0
    fewer = pipe(box, "a red box", generator=torch.Generator().manual_seed(7), num_inference_steps=2)
    assert not np.array_equal(a.image, fewer.image)
    assert pipe(box, "a red box").seed == 9  # no generator: sampler.seed
    rgb, point_map = a.images[0], a.point_maps[0]
    assert rgb.mode == "RGB" and rgb.size == (48, 48) and np.array_equal(np.asarray(rgb), a.image)
    assert point_map.mode == "RGB" and point_map.size == (48, 48)


def test_from_pretrained_torch_dtype_and_to_move_every_component():
    half = RefAny3DPipeline.from_pretrained(settings=SETTINGS, torch_dtype=torch.bfloat16)
    parts = ("transformer", "vae", "text_encoder", "text_encoder_2")
    assert half.dtype == torch.bfloat16 and half.settings.runtime.dtype == "bfloat16"
    assert all(next(getattr(half.components, n).parameters()).dtype == torch.bfloat16 for n in parts)
    assert half.to("cpu", torch.float32) is half
    assert all(next(getattr(half.components, n).parameters()).dtype == torch.float32 for n in parts)
    assert half.device == torch.device("cpu") and half.settings.runtime.dtype == "float32"
    with pytest.raises(SettingsError, match="torch_dtype: torch.int8 is not one of"):
        half.to(dtype=torch.int8)


def test_loading_adapters_of_other_flags_fails_naming_the_flag(exported, trained, tmp_path):
    with pytest.raises(SettingsError, match=r"model.lora_rank: 4 was asked, but --lora .* trained with 16"):
        RefAny3DPipeline.from_pretrained(exported, settings=override(SETTINGS, **{"model.lora_rank": 4}))
    other = tmp_path / "other"
    other.mkdir()
    for path in exported.rglob("*"):
        if path.is_file():
            (other / path.relative_to(exported)).parent.mkdir(parents=True, exist_ok=True)
            (other / path.relative_to(exported)).write_bytes(path.read_bytes())
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "point_map_branch": False}))
    with pytest.raises(SettingsError, match=r"model.point_map_branch: True was asked, .* trained with False"):
        trained.load_lora_weights(other)


def test_adapters_of_other_base_weights_are_refused_by_fingerprint(exported, trained, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for path in exported.rglob("*"):
        if path.is_file():
            (other / path.relative_to(exported)).parent.mkdir(parents=True, exist_ok=True)
            (other / path.relative_to(exported)).write_bytes(path.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config["base"]["fingerprint"] = "0123456789abcdef"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(SettingsError, match="fingerprint 0123456789abcdef"):
        trained.load_lora_weights(other)


def _forward_inputs(pipe, run):
    """(run's result, the transformer's forward kwargs, one dict per call)."""
    seen = []
    hook = pipe.components.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs), with_kwargs=True
    )
    try:
        return run(), seen
    finally:
        hook.remove()


def test_call_height_and_width_set_the_generated_size(pipe, box, tmp_path):
    out, seen = _forward_inputs(pipe, lambda: pipe(box, "a red box", height=32, width=64, seed=1))
    assert out.image.shape == (32, 64, 3) and out.point_map.shape == (32, 64, 3)
    assert out.images[0].size == (64, 32) and out.point_maps[0].size == (64, 32)
    assert {kwargs["target_size"] for kwargs in seen} == {(2, 4)}  # 16 px a token: rows, columns
    meta = json.loads((out.save(tmp_path / "s") / "sample.json").read_text())
    assert (meta["height"], meta["width"]) == (32, 64)
    views = render_conditions(out.mesh, pipe.settings.render)
    image, point_map = pipe.generate(views, "a red box", height=64, width=32)
    assert image.shape == (64, 32, 3) and point_map.shape == (64, 32, 3)
    assert pipe(box, "a red box", width=32).image.shape == (48, 32, 3)  # height: sampler.resolution


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 40}, "height: 40 is not a positive multiple of 16 px"),
        ({"width": 0}, "width: 0 is not a positive multiple of 16 px"),
        ({"width": 32.0}, "width: 32.0 is not a positive multiple of 16 px"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt: 0 is not a positive int"),
        ({"prompt": []}, r"prompt: \[\] is not a string or a non-empty list of strings"),
    ],
)
def test_call_bad_size_or_count_fails_naming_the_argument(pipe, box, kwargs, message):
    kwargs = {"prompt": "a red box", **kwargs}
    with pytest.raises(ValueError, match=f"^{message}"):
        pipe(box, **kwargs)


def test_call_num_images_per_prompt_draws_different_reproducible_images_in_one_batch(pipe, box):
    def run(seed):
        return pipe(box, "a red box", num_images_per_prompt=2, generator=torch.Generator().manual_seed(seed))

    out, seen = _forward_inputs(pipe, lambda: run(3))
    assert len(out) == 2 and len(out.images) == 2 and len(out.point_maps) == 2
    assert len(seen) == pipe.settings.sampler.steps  # one batch: a forward pass per step
    assert all(kwargs["target_rgb"].shape[0] == 2 for kwargs in seen)
    # different noise, different images (the same noise differs by float rounding alone: <= 1 level)
    first, second = (image.astype(int) for image in out.image_arrays)
    assert np.abs(first - second).mean() > 8
    assert np.abs(out.point_map_arrays[0] - out.point_map_arrays[1]).mean() > 0.03
    again = run(3)
    assert all(np.array_equal(a, b) for a, b in zip(out.image_arrays, again.image_arrays))
    assert all(np.array_equal(a, b) for a, b in zip(out.point_map_arrays, again.point_map_arrays))
    # the stream goes image by image: the first of n is what n = 1 draws from the same seed
    one = pipe(box, "a red box", generator=torch.Generator().manual_seed(3))
    assert np.abs(out.image.astype(int) - one.image.astype(int)).max() <= 1
    np.testing.assert_allclose(out.point_map, one.point_map, atol=1e-4)


def test_call_prompt_list_gives_num_images_per_prompt_each_prompt_by_prompt(pipe, box, tmp_path):
    from refany3d.evaluate.run import find_samples

    prompts = ["a red box", "a box on a beach"]
    run = lambda: pipe(box, prompts, num_images_per_prompt=2, seed=2)  # noqa: E731
    out, seen = _forward_inputs(pipe, run)
    assert out.prompts == ("a red box", "a red box", "a box on a beach", "a box on a beach")
    text = seen[0]["encoder_hidden_states"]
    assert torch.equal(text[0], text[1]) and torch.equal(text[2], text[3])
    assert not torch.equal(text[0], text[2])
    saved = find_samples(out.save(tmp_path / "s"))  # one sample directory per image
    assert [p.name for p in saved] == ["00", "01", "02", "03"]
    meta = json.loads((saved[2] / "sample.json").read_text())
    assert meta["prompt"] == "a box on a beach" and (meta["image_index"], meta["num_images"]) == (2, 4)
    assert np.array_equal(np.asarray(Image.open(saved[3] / "image.png")), out.image_arrays[3])
