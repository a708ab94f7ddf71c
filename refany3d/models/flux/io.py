"""Save and load the trained parts of RefAny3D: both peft adapters and the domain switcher.

Directory layout (safetensors only, nothing is unpickled):

    <dir>/reference/adapter_model.safetensors + adapter_config.json   (standard peft format)
    <dir>/domain/adapter_model.safetensors + adapter_config.json      (when the Domain-LoRA is on)
    <dir>/domain_switcher.safetensors
    <dir>/base_model.safetensors                                      (only under model.train_base:
                                                                       the trained Flux weights)
"""

from __future__ import annotations

import copy
from pathlib import Path

from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from refany3d.config import SettingsError
from refany3d.models.flux.transformer import RefAny3DTransformer

ADAPTER_WEIGHTS = "adapter_model.safetensors"
SWITCHER_WEIGHTS = "domain_switcher.safetensors"
BASE_WEIGHTS = "base_model.safetensors"


def save_adapters(model: RefAny3DTransformer, directory: str | Path, base: str = "") -> Path:
    """Write the adapters and the domain switcher of `model` under `directory`; returns it.
    `base`: the base model's id or path, recorded as peft's `base_model_name_or_path` and in each
    safetensors file's metadata, so a peft user can tell what the adapters adapt."""
    directory = Path(directory)
    for name, config in model.lora_configs.items():
        (directory / name).mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(model.flux, adapter_name=name)
        meta = _metadata(base, name)
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        save_file(tensors, directory / name / ADAPTER_WEIGHTS, metadata=meta)
        saved = copy.copy(config)  # the model's own config stays as it was built
        saved.base_model_name_or_path = base or None
        saved.save_pretrained(directory / name)
    switcher = {k: v.detach().contiguous() for k, v in model.domain_switcher.state_dict().items()}
    save_file(switcher, directory / SWITCHER_WEIGHTS, metadata=_metadata(base, "domain_switcher"))
    if model.train_base:
        save_file(_base_state(model), directory / BASE_WEIGHTS, metadata=_metadata(base, "base"))
    return directory


def _base_state(model: RefAny3DTransformer) -> dict:
    """The Flux weights without the adapters' (peft's `lora_` tensors)."""
    return {k: v.detach().contiguous() for k, v in model.flux.state_dict().items() if "lora_" not in k}


def _metadata(base: str, part: str) -> dict[str, str]:
    """safetensors metadata (strings only) of one saved part."""
    from refany3d import __version__

    return {
        "format": "pt",
        "base_model_name_or_path": base,
        "part": part,  # reference / domain adapter, or the domain switcher
        "library": "refany3d",
        "refany3d_version": __version__,
    }


def load_adapters(model: RefAny3DTransformer, directory: str | Path) -> None:
    """Load what `save_adapters` wrote into a model built with the same settings."""
    directory = Path(directory)
    device = next(model.parameters()).device
    for name, config in model.lora_configs.items():
        saved = LoraConfig.from_pretrained(directory / name)
        if (saved.r, saved.lora_alpha) != (config.r, config.lora_alpha):
            raise SettingsError(
                f"model.lora_rank / model.lora_alpha: {config.r} / {config.lora_alpha}, but the adapters "
                f"in {directory / name} have {saved.r} / {saved.lora_alpha}; set them to match"
            )
        state = load_file(directory / name / ADAPTER_WEIGHTS, device=str(device))
        result = set_peft_model_state_dict(model.flux, state, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{directory / name}: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
            )
    model.domain_switcher.load_state_dict(load_file(directory / SWITCHER_WEIGHTS, device=str(device)))
    if model.train_base:
        if not (directory / BASE_WEIGHTS).is_file():
            raise SettingsError(
                f"model.train_base: true, but {directory} holds no {BASE_WEIGHTS} (adapters of a frozen base)"
            )
        state = load_file(directory / BASE_WEIGHTS, device=str(device))
        expected = set(_base_state(model))
        if set(state) != expected:
            raise ValueError(f"{directory / BASE_WEIGHTS}: other tensors than the model's base")
        model.flux.load_state_dict(state, strict=False)
