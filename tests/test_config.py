import pytest

from refany3d.config import (
    BuildSettings,
    DetectorSettings,
    EvaluateSettings,
    SampleSettings,
    SettingsError,
    TrainSettings,
    load_settings,
    override,
    parse_overrides,
    settings_hash,
)
from refany3d.stages.dag import check_until, truth_stages, uses_truth


def test_load_settings_defaults_match_design():
    s = load_settings(BuildSettings, environ={})
    assert s.quality.min_score == 5
    assert s.verify.min_iou == 0.8 and s.verify.max_lpips == 0.3
    assert s.render.views == 8 and s.render.resolution == 512
    assert s.detector.backend == "truth"


def test_load_settings_priority_file_env_overrides(tmp_path):
    cfg = tmp_path / "build.yaml"
    cfg.write_text("verify:\n  min_iou: 0.7\nrender:\n  views: 6\nstorage:\n  shard_size: 10\n")
    env = {"REFANY3D__RENDER__VIEWS": "4", "REFANY3D__STORAGE__SHARD_SIZE": "12"}
    s = load_settings(BuildSettings, cfg, {"storage.shard_size": "20"}, environ=env)
    assert s.verify.min_iou == 0.7  # file
    assert s.render.views == 4  # env beats file
    assert s.storage.shard_size == 20  # CLI beats env


def test_load_settings_toml(tmp_path):
    cfg = tmp_path / "train.toml"
    cfg.write_text("[model]\nlora_rank = 8\ntext_agnostic = false\n[optim]\nsteps = 10\n")
    s = load_settings(TrainSettings, cfg, environ={})
    assert (s.model.lora_rank, s.model.text_agnostic, s.optim.steps) == (8, False, 10)


@pytest.mark.parametrize(
    "key,value,message",
    [
        (
            "detector.backend",
            "yolo",
            "detector.backend: 'yolo' is not one of truth, groundingdino, hf-grounding-dino",
        ),
        ("verify.min_iou", "1.5", "verify.min_iou: 1.5 is out of range; allowed: <= 1.0"),
        ("render.views", "0", "render.views: 0 is out of range; allowed: >= 1"),
        ("render.views", "eight", "render.views: 'eight' is not a valid int"),
        ("render.turntable", "maybe", "render.turntable: 'maybe' is not a boolean; allowed: true, false"),
        ("render.colour", "red", "render.colour: unknown setting; allowed:"),
    ],
)
def test_load_settings_invalid_value_names_field_and_allowed(key, value, message):
    with pytest.raises(SettingsError) as err:
        load_settings(BuildSettings, overrides={key: value}, environ={})
    assert str(err.value).startswith(message)


def test_load_settings_invalid_env_value_fails():
    with pytest.raises(SettingsError, match="segmenter.max_area_ratio"):
        load_settings(BuildSettings, environ={"REFANY3D__SEGMENTER__MAX_AREA_RATIO": "2"})


def test_load_settings_missing_file_fails(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(BuildSettings, tmp_path / "nope.yaml", environ={})


def test_section_construction_validates():
    with pytest.raises(SettingsError, match="box_threshold"):
        DetectorSettings(box_threshold=-1.0)


def test_override_returns_new_object_and_keeps_original():
    s = BuildSettings()
    t = override(s, **{"render.views": 4})
    assert s.render.views == 8 and t.render.views == 4
    with pytest.raises(AttributeError):
        s.render.views = 3  # frozen


def test_parse_overrides_rejects_missing_equals():
    assert parse_overrides(["a.b=1", "c=x=y"]) == {"a.b": "1", "c": "x=y"}
    with pytest.raises(SettingsError, match="expected section.field=value"):
        parse_overrides(["a.b"])


def test_settings_hash_changes_with_value():
    s = BuildSettings()
    assert settings_hash(s.verify) == settings_hash(BuildSettings().verify)
    assert settings_hash(s.verify) != settings_hash(override(s, **{"verify.min_iou": 0.9}).verify)


def test_check_until_names_the_stages():
    with pytest.raises(SettingsError) as err:
        check_until(load_settings(BuildSettings, overrides={"until": "paint"}, environ={}))
    assert str(err.value).startswith("until: 'paint' is not one of source, quality, split")


def test_uses_truth_only_for_stages_that_run():
    assert not uses_truth(BuildSettings(until="split"))
    assert truth_stages(BuildSettings(until="detect")) == ["detect"]


def test_env_settings_apply_only_to_commands_whose_settings_have_the_section():
    env = {"REFANY3D__RUNTIME__DEVICE": "cuda", "REFANY3D__VERIFY__MIN_IOU": "0.85"}
    assert load_settings(EvaluateSettings, environ=env) == EvaluateSettings()  # no runtime, no verify
    train = load_settings(TrainSettings, environ=env)
    assert train.runtime.device == "cuda" and train == override(TrainSettings(), **{"runtime.device": "cuda"})
    build = load_settings(BuildSettings, environ=env)
    assert build.runtime.device == "cuda" and build.verify.min_iou == 0.85
    assert load_settings(SampleSettings, environ=env).runtime.device == "cuda"


def test_unknown_keys_stay_errors_in_files_overrides_and_known_env_sections(tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("runtime:\n  device: cuda\n")
    with pytest.raises(SettingsError, match="runtime: unknown setting"):
        load_settings(EvaluateSettings, cfg, environ={})
    with pytest.raises(SettingsError, match="verify: unknown setting"):
        load_settings(TrainSettings, overrides={"verify.min_iou": "0.85"}, environ={})
    with pytest.raises(SettingsError, match="runtime.devic: unknown setting"):
        load_settings(TrainSettings, environ={"REFANY3D__RUNTIME__DEVIC": "cuda"})
