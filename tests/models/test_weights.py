import pytest

from refany3d.config import BuildSettings, SettingsError, override
from refany3d.models.weights import HF_SAM, WeightsError, check_weights, resolve_pretrained
from refany3d.stages.dag import ancestors


def _settings(**dotted):
    return override(BuildSettings(), **dotted)


def test_check_weights_truth_backends_need_nothing():
    _check(BuildSettings())


def test_check_weights_missing_sam_checkpoint_names_setting_files_and_source(tmp_path):
    settings = _settings(**{"segmenter.backend": "sam", "segmenter.weights": str(tmp_path / "nope.pth")})
    with pytest.raises(WeightsError) as err:
        _check(settings)
    msg = str(err.value)
    assert "segmenter.weights" in msg and "no such file" in msg and "sam_vit_h_4b8939.pth" in msg
    assert isinstance(err.value, SettingsError)


def test_check_weights_empty_depth_weights_says_how_to_get_them():
    with pytest.raises(WeightsError, match=r"depth.weights is empty.*config.json.*apple/DepthPro-hf"):
        _check(_settings(**{"depth.backend": "depth-pro"}))


def test_check_weights_incomplete_directory_lists_missing_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    settings = _settings(**{"detector.backend": "hf-grounding-dino", "detector.weights": str(tmp_path)})
    with pytest.raises(WeightsError) as err:
        _check(settings)
    msg = str(err.value)
    assert "detector.weights" in msg and "model.safetensors" in msg and "tokenizer_config.json" in msg
    assert "config.json or" not in msg.split("lacks")[1].split(";")[0]  # config.json is present


def test_check_weights_uncached_hub_id_is_an_error_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = _settings(**{"segmenter.backend": "hf-sam", "segmenter.weights": "facebook/sam-vit-huge"})
    with pytest.raises(WeightsError, match="not in the local Hugging Face cache"):
        _check(settings)


def test_check_weights_only_checks_stages_that_will_run():
    settings = _settings(**{"depth.backend": "depth-pro", "until": "segment"})
    _check(settings)  # depth does not run
    with pytest.raises(WeightsError):
        check_weights(settings, stages=["depth"])


def test_check_weights_truth_backend_on_subjects200k_is_an_error():
    settings = _settings(**{"source.kind": "subjects200k"})
    with pytest.raises(WeightsError, match="detector.backend='truth'.*source.kind='subjects200k'"):
        _check(settings)


def test_resolve_pretrained_accepts_complete_directory(tmp_path):
    for name in ("config.json", "model.safetensors", "processor_config.json"):
        (tmp_path / name).write_text("{}")
    assert resolve_pretrained(str(tmp_path), HF_SAM) == tmp_path


def _check(settings: BuildSettings) -> None:
    """check_weights over the stages the build of `settings` runs, as the CLI calls it."""
    check_weights(settings, ancestors(settings.until))
