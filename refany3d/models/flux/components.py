"""The parts of FLUX.1-dev that RefAny3D trains and samples with, and the encoders around the network.

`load_components(settings, device, dtype)` returns the RefAny3D transformer (FLUX.1-dev's transformer
with both adapters and the domain switcher), the VAE, CLIP-L + T5 text encoders with their
tokenizers and the flow-matching scheduler, either

- from `model.pretrained`: a local directory (or a hub id present in the local HF cache) laid out as
  the published `black-forest-labs/FLUX.1-dev` snapshot: `model_index.json`, `transformer/`, `vae/`,
  `text_encoder/` (CLIP), `text_encoder_2/` (T5), `tokenizer/`, `tokenizer_2/`, `scheduler/`. Sizes
  come from its configs; a missing or incomplete part fails before any work, naming the setting.
- or, with an empty `model.pretrained`, the embedded default: the same classes built from tiny
  configs with fixed-seed random weights (the same weights in every process, so adapters trained on
  it load back for sampling) and tokenizers built from a local character vocabulary. Outputs made
  with it are labelled `TINY_LABEL`.

Encoding (FluxPipeline's conventions): images -> VAE latent mean, `(z - shift) * scale`, packed 2x2
into (B, h*w, 4*C) tokens; prompts -> T5 last hidden states (B, T, D) and CLIP's pooled output (B, P).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refany3d.config import ModelSettings
from refany3d.models.flux.transformer import TINY_FLUX_CONFIG, RefAny3DTransformer
from refany3d.models.weights import WeightsError

TINY_LABEL = "tiny random-weight FLUX-architecture model (embedded default, not a trained model)"
TINY_SEED = 20240601  # fixed: every process builds the same tiny base weights
TINY_TEXT_TOKENS = 16  # T5 tokens per prompt for the tiny model (FLUX.1-dev: 512)
FLUX_TEXT_TOKENS = 512
CLIP_TOKENS = 77

# FLUX.1-dev subfolders and the files each must hold (any one name of a tuple).
_DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
)
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
FLUX_LAYOUT: dict[str, tuple[tuple[str, ...], ...]] = {
    "transformer": (("config.json",), _DIFFUSERS_WEIGHTS),
    "vae": (("config.json",), _DIFFUSERS_WEIGHTS),
    "text_encoder": (("config.json",), _TRANSFORMERS_WEIGHTS),
    "text_encoder_2": (("config.json",), _TRANSFORMERS_WEIGHTS),
    "tokenizer": (("tokenizer_config.json",),),
    "tokenizer_2": (("tokenizer_config.json",),),
    "scheduler": (("scheduler_config.json",),),
}

TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),  # 4 blocks: 8x downsampling, as FLUX.1-dev's VAE
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 32,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
TINY_CLIP_CONFIG = {
    "hidden_size": 32,  # = TINY_FLUX_CONFIG pooled_projection_dim
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": CLIP_TOKENS,
    "projection_dim": 32,
}
TINY_T5_CONFIG = {
    "d_model": 32,  # = TINY_FLUX_CONFIG joint_attention_dim
    "d_ff": 37,
    "d_kv": 8,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
}
FLUX_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


@dataclass
class FluxComponents:
    """Everything RefAny3D needs around the network; `label` says where the weights came from."""

    transformer: RefAny3DTransformer
    vae: nn.Module  # diffusers AutoencoderKL
    text_encoder: nn.Module  # transformers CLIPTextModel (pooled prompt embedding)
    tokenizer: Any  # CLIP tokenizer
    text_encoder_2: nn.Module  # transformers T5EncoderModel (per-token prompt embeddings)
    tokenizer_2: Any  # T5 tokenizer
    scheduler: Any  # diffusers FlowMatchEulerDiscreteScheduler
    label: str
    identity: str  # short hash of the base weights' source: part of every latent/text cache key
    text_tokens: int  # T5 tokens per prompt

    @property
    def tiny(self) -> bool:
        return self.label == TINY_LABEL

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per VAE latent cell (8 for FLUX.1-dev); one packed token covers twice that."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


# --------------------------------------------------------------------------- loading


def resolve_pretrained(value: str) -> Path:
    """The local directory of `model.pretrained` (a directory, or a hub id in the local HF cache)."""
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(value, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not available locally"
        raise WeightsError(
            f"model.pretrained: {value!r} is neither a directory nor a hub id in the local HF cache; "
            "on a machine with hub access run `hf download black-forest-labs/FLUX.1-dev --local-dir DIR` "
            "and set model.pretrained=DIR"
        ) from None


def check_pretrained(value: str) -> Path:
    """Fail with one line naming `model.pretrained` unless it holds a complete FLUX.1-dev layout."""
    root = resolve_pretrained(value)
    missing = [] if (root / "model_index.json").is_file() else ["model_index.json"]
    for sub, groups in FLUX_LAYOUT.items():
        for names in groups:
            if not any((root / sub / name).is_file() for name in names):
                missing.append(f"{sub}/{' or '.join(names)}")
        for index in (n for names in groups for n in names if n.endswith(".index.json")):
            if (root / sub / index).is_file():
                shards = set(json.loads((root / sub / index).read_text())["weight_map"].values())
                missing += [f"{sub}/{s}" for s in sorted(shards) if not (root / sub / s).is_file()]
    if missing:
        raise WeightsError(
            f"model.pretrained: {str(root)!r} is not a complete FLUX.1-dev snapshot; missing "
            f"{', '.join(missing[:6])}"
        )
    return root


def load_components(
    settings: ModelSettings, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> FluxComponents:
    """The transformer (with adapters), VAE, text encoders, tokenizers and scheduler of `settings`."""
    if settings.pretrained:
        parts, label, identity, tokens = _pretrained_parts(check_pretrained(settings.pretrained), dtype)
    else:
        parts, label, identity, tokens = _tiny_parts(), TINY_LABEL, "tiny-" + str(TINY_SEED), TINY_TEXT_TOKENS
    flux = cast_module(parts.pop("transformer"), device, dtype)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        parts[name] = cast_module(parts[name], device, dtype).eval().requires_grad_(False)
    return FluxComponents(
        transformer=wrap_transformer(flux, settings),
        label=label,
        identity=identity,
        text_tokens=settings.text_tokens or tokens,
        **parts,
    )


def cast_module(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """`model.to(device, dtype)`. diffusers' `ModelMixin.to` warns that modules "should be kept in
    float32" whenever `_keep_in_fp32_modules` is set, even to `[]` (FLUX's transformer and VAE):
    where there are none to keep, nothing is lost by casting through `nn.Module.to`, silently."""
    if getattr(model, "_keep_in_fp32_modules", None):
        return model.to(device=device, dtype=dtype)  # a real warning: let it through
    return nn.Module.to(model, device=device, dtype=dtype)


def wrap_transformer(flux: nn.Module, settings: ModelSettings) -> RefAny3DTransformer:
    """RefAny3D around an unchanged `FluxTransformer2DModel` (adapters injected in place)."""
    return RefAny3DTransformer(
        flux,
        lora_rank=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        shared_positions=settings.shared_positions,
        text_agnostic=settings.text_agnostic,
        domain_lora=settings.domain_lora,
        point_map_branch=settings.point_map_branch,
        attention=settings.attention,
        gradient_checkpointing=settings.gradient_checkpointing,
        checkpoint_saves_attention=settings.checkpoint_saves_attention,
        compile_blocks=settings.compile_blocks,
        independent_conditions=settings.independent_conditions,
        fp8_base=settings.fp8_base,
        train_base=settings.train_base,
    )


def _pretrained_parts(root: Path, dtype: torch.dtype) -> tuple[dict[str, Any], str, str, int]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    parts = {
        "transformer": FluxTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=dtype),
        "vae": AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype),
        "text_encoder": CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype),
        "text_encoder_2": T5EncoderModel.from_pretrained(root / "text_encoder_2", torch_dtype=dtype),
        "tokenizer": AutoTokenizer.from_pretrained(root / "tokenizer"),
        "tokenizer_2": AutoTokenizer.from_pretrained(root / "tokenizer_2"),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
    }
    return parts, f"FLUX.1-dev from {root}", _directory_identity(root), FLUX_TEXT_TOKENS


def _directory_identity(root: Path) -> str:
    """Hash of every config and weight file's name and size (cheap; changes when the weights do)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts):
        h.update(f"{path.relative_to(root)}:{path.stat().st_size}\n".encode())
        if path.suffix == ".json":
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- the embedded tiny model


def _char_vocab() -> list[str]:
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    chars += list(".,;:!?'-()/&")
    return ["<pad>", "<unk>", "<s>", "</s>"] + chars + [f"##{c}" for c in chars]


def tiny_tokenizer(bos: bool):
    """A WordPiece tokenizer over single characters (every word spells out), built offline.

    `bos`: CLIP style `<s> text </s>`; otherwise T5 style `text </s>`. Pads with `<pad>` (id 0).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_char_vocab())}
    tok = Tokenizer(WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    template = "<s> $A </s>" if bos else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=CLIP_TOKENS if bos else FLUX_TEXT_TOKENS,
    )


def tiny_flux() -> nn.Module:
    """The tiny `FluxTransformer2DModel` of the embedded default, always with the same weights."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return FluxTransformer2DModel(**TINY_FLUX_CONFIG)


def _tiny_parts() -> dict[str, Any]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    vocab = len(_char_vocab())
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return {
            "transformer": tiny_flux(),
            "vae": AutoencoderKL(**TINY_VAE_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=vocab, **ids, **TINY_CLIP_CONFIG)),
            "text_encoder_2": T5EncoderModel(
                T5Config(vocab_size=vocab, pad_token_id=0, eos_token_id=3, **TINY_T5_CONFIG)
            ),
            "tokenizer": tiny_tokenizer(bos=True),
            "tokenizer_2": tiny_tokenizer(bos=False),
            "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        }


def save_tiny_flux_snapshot(directory: str | Path) -> Path:
    """Write the embedded tiny model in the FLUX.1-dev snapshot layout (a real `FluxPipeline` saved
    with `save_pretrained`), e.g. for tests of `model.pretrained` loading."""
    from diffusers import FluxPipeline

    parts = _tiny_parts()
    FluxPipeline(**parts).save_pretrained(directory, safe_serialization=True)
    return Path(directory)


# --------------------------------------------------------------------------- encoding


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) VAE latents -> (B, H/2 * W/2, 4C) tokens, 2x2 patches in FluxPipeline's order."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `pack_latents`: (B, h*w, 4C) tokens of a packed (h, w) grid -> (B, C, 2h, 2w)."""
    b, _, d = tokens.shape
    h, w = size
    x = tokens.view(b, h, w, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h * 2, w * 2)


@torch.no_grad()
def encode_images(components: FluxComponents, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [-1, 1] -> (B, H/16 * W/16, 64) packed latents `(z - shift) * scale`.

    Uses the latent distribution's mean (deterministic, so a cached latent equals a fresh one).
    """
    vae = components.vae
    param = next(vae.parameters())
    z = vae.encode(images.to(param.device, param.dtype)).latent_dist.mode()
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    return pack_latents(z)


BLANK_VIEW = -1.0  # a blank reference view: black, in the encoders' [-1, 1] image range


@torch.no_grad()
def blank_references(components: FluxComponents, views: int, size: int) -> torch.Tensor:
    """(views, Lc, C) packed latents of `views` blank (black, `size` px) reference views.

    The one definition of "no references": training's reference dropout trains on it
    (`train.encode.dropout_encodings`) and sampling's image-guidance pass conditions on it
    (`sampling.pipeline`), so the unconditional branch sees what the model learnt as "dropped".
    """
    black = torch.full((1, 3, size, size), BLANK_VIEW)
    return encode_images(components, black)[0].expand(views, -1, -1)


@torch.no_grad()
def decode_latents(components: FluxComponents, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Packed latents (B, h*w, 64) of an (h, w) token grid -> (B, 3, 16h, 16w) RGB in [-1, 1]."""
    vae = components.vae
    z = unpack_latents(tokens, size) / vae.config.scaling_factor + vae.config.shift_factor
    param = next(vae.parameters())
    return vae.decode(z.to(param.device, param.dtype)).sample.clamp(-1, 1)


@torch.no_grad()
def encode_prompts(components: FluxComponents, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> T5 embeddings (B, text_tokens, D) and pooled CLIP embeddings (B, P).

    Both tokenizers pad to their fixed lengths (CLIP 77, T5 `text_tokens`) and truncate, as
    FluxPipeline does; an empty prompt is encoded like any other (the text dropout of training).
    """
    device = next(components.text_encoder.parameters()).device
    clip_ids = components.tokenizer(
        prompts, padding="max_length", max_length=CLIP_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    t5_ids = components.tokenizer_2(
        prompts,
        padding="max_length",
        max_length=components.text_tokens,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    pooled = components.text_encoder(clip_ids.to(device), output_hidden_states=False).pooler_output
    text = components.text_encoder_2(t5_ids.to(device), output_hidden_states=False)[0]
    return text, pooled
