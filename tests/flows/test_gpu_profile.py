"""The `gpu` profile of the build deployment on the gpu pool: valid settings, each documented with its
measurement, and applied only where the deployed settings keep a default."""

from __future__ import annotations

from pathlib import Path

import pytest

from refany3d.config import BuildSettings, SettingsError, override
from refany3d.flows.deployments import GPU_PROFILE, build_parameters, gpu_profile

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operating.md"


def _value(settings: BuildSettings | dict, dotted: str):
    section, name = dotted.split(".")
    if isinstance(settings, dict):  # a deployment's parameters
        return settings[section][name]
    return getattr(getattr(settings, section), name)


def test_the_gpu_profile_is_valid_settings_and_the_gpu_pool_gets_it():
    profiled = build_parameters("gpu")["settings"]
    for key, value in GPU_PROFILE.items():
        assert _value(profiled, key) == value, key
    assert gpu_profile(BuildSettings()).mesher.compile is True  # valid: it builds BuildSettings
    cpu = build_parameters("cpu")["settings"]
    assert cpu["runtime"]["device"] == "cpu" and cpu["mesher"]["compile"] is False


def test_a_profile_key_that_is_no_setting_fails_naming_it(monkeypatch):
    monkeypatch.setitem(GPU_PROFILE, "mesher.batch_sise", 4)
    with pytest.raises(SettingsError, match="batch_sise"):
        gpu_profile(BuildSettings())


def test_the_profile_leaves_what_the_deployed_settings_set():
    base = override(BuildSettings(), **{"mesher.batch_size": 2, "runtime.device": "cuda:1"})
    profiled = gpu_profile(base)
    assert profiled.mesher.batch_size == 2 and profiled.runtime.device == "cuda:1"
    assert profiled.mesher.compile is True  # left at its default there: the profile's


def test_every_profile_setting_is_documented_with_its_value():
    text = DOCS.read_text()
    for key, value in GPU_PROFILE.items():
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        assert f"`{key}={shown}`" in text, key
