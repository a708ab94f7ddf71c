"""Training checkpoints: written once, atomically, listed in a manifest; loaded without unpickling.

A checkpoint is a directory under `OUT/checkpoints/` holding

    adapters/          both LoRA adapters (peft safetensors) + domain_switcher.safetensors (io.py)
    optimizer.pt       optimizer state dict   } torch.save of tensors and numbers only, read back
    lr_scheduler.pt    LR scheduler state     } with torch.load(weights_only=True)
    rng.json           python / numpy RNG states; rng.safetensors: torch CPU (+ CUDA) RNG states
    config.json        the model flags the adapters were trained with (`model_config`) and the base
    README.md          model card: Hugging Face metadata (base model, library, tags, dataset, metrics)
    manifest.json      step, data position (next global sample position), run facts, file list

and `OUT/checkpoints/manifest.json` lists the finished checkpoints in step order. The step of a
checkpoint is read from its manifest, never parsed from a directory name. A checkpoint directory is
filled under a temporary name and renamed into place, then the list is rewritten atomically, so a
crash leaves either the old list or the new one.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from refany3d import __version__
from refany3d.config import ModelSettings, SettingsError, override
from refany3d.models.flux.io import SWITCHER_WEIGHTS, load_adapters, save_adapters
from refany3d.models.flux.transformer import RefAny3DTransformer
from refany3d.storage.fs import atomic_rename, url_to_fs
from refany3d.storage.store import join, write_atomic

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
CONFIG = "config.json"  # the model flags of a checkpoint (docs/training.md)
MODEL_CARD = "README.md"  # its Hugging Face model card
# ModelSettings fields that decide what the trained adapters are and what they were trained for:
# sampling or resuming takes them from the checkpoint's config.json.
MODEL_FLAGS = (
    "num_views",
    "point_map_branch",
    "shared_positions",
    "text_agnostic",
    "independent_conditions",
    "domain_lora",
    "lora_rank",
    "lora_alpha",
    "train_base",
)
# those the saved tensors follow (shapes; train_base: whether the base is saved with them)
WEIGHT_FLAGS = ("domain_lora", "lora_rank", "lora_alpha", "train_base")
# the sampling defaults a checkpoint carries (config.json "pipeline"): what it was trained at
PIPELINE_KEYS = (
    "sampler.resolution",
    "sampler.steps",
    "sampler.guidance",
    "sampler.image_guidance",
    "render.resolution",
)
POINTER = "promoted.json"  # the promoted run of scheduled retraining (flows/train.py)
FORMAT = 1


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    position: int  # next global sample position of the data stream
    url: str  # the checkpoint directory
    manifest: dict[str, Any]


def rng_states() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able python/numpy states, torch states as uint8 tensors) of this process."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    plain = {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return plain, tensors


def set_rng_states(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def list_checkpoints(out: str) -> list[CheckpointInfo]:
    """Finished checkpoints of the run in `out`, oldest first (from the manifest list)."""
    fs, root = url_to_fs(out)
    path = join(root, CHECKPOINTS, MANIFEST)
    if not fs.exists(path):
        return []
    entries = json.loads(fs.cat_file(path))["checkpoints"]
    return [CheckpointInfo(e["step"], e["position"], join(out, CHECKPOINTS, e["dir"]), e) for e in entries]


def refuse_used_out(out: str) -> None:
    """Fail (SettingsError naming checkpoint.dir) when `out` already holds anything: a fresh run
    there would prune the other run's checkpoints as its own and overwrite its metrics.jsonl."""
    fs, root = url_to_fs(out)
    if fs.isdir(root) and fs.ls(root, detail=False):
        raise SettingsError(
            f"checkpoint.dir: {out!r} is not empty (another run's checkpoints or logs); "
            "pass --resume to continue that run, or choose an empty --out"
        )


def pipeline_defaults(settings: Any) -> dict[str, Any]:
    """The sampling defaults (`PIPELINE_KEYS`) of a training run (`TrainSettings`: the resolutions
    it trains at, its previews' steps and guidance) or of a pipeline (`SampleSettings`)."""
    if hasattr(settings, "data"):  # TrainSettings
        return {
            "sampler.resolution": settings.data.resolution,
            "render.resolution": settings.data.condition_resolution,
            "sampler.steps": settings.checkpoint.sample_steps,
            "sampler.guidance": settings.checkpoint.guidance,
        }
    out = {}
    for key in PIPELINE_KEYS:
        section, name = key.split(".")
        out[key] = getattr(getattr(settings, section), name)
    return out


def model_config(
    settings: ModelSettings,
    model: RefAny3DTransformer,
    base: dict[str, Any],
    pipeline: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json of a checkpoint: the model flags (`MODEL_FLAGS`), each adapter's peft config
    (rank, alpha, target modules), the domain switcher's sizes and the base model (`base`: its id or
    path, label, fingerprint): what rebuilding the trained model needs; `pipeline`: its sampling
    defaults (`pipeline_defaults`)."""
    from refany3d.models.flux.lora import TARGET_MODULES

    switcher = model.domain_switcher
    return {
        "_class_name": "RefAny3DTransformer",
        "_refany3d_version": __version__,
        **{flag: getattr(settings, flag) for flag in MODEL_FLAGS},
        "adapters": {
            name: {"r": c.r, "lora_alpha": c.lora_alpha, "target_modules": TARGET_MODULES}
            for name, c in model.lora_configs.items()
        },
        "domain_switcher": {
            "domains": ["rgb", "point_map"],
            "embedding_dim": switcher.embedding.embedding_dim,
            "inner_dim": switcher.linear_2.out_features,
        },
        "base": base,
        **({"pipeline": pipeline} if pipeline else {}),
    }


def model_card(config: dict[str, Any], manifest: dict[str, Any]) -> str:
    """README.md of a checkpoint: Hugging Face model-card metadata (base model, library, tags, the
    dataset version and the training metrics at this step) and how to use it."""
    base = config["base"]
    facts = {
        "step": manifest["step"],
        "dataset_version": manifest.get("dataset_version") or None,
        "metrics": manifest.get("metrics") or {},
    }
    front = {
        "base_model": base.get("name_or_path") or None,
        "library_name": "peft",
        "pipeline_tag": "text-to-image",
        "tags": ["refany3d", "flux", "lora", "point-map", "3d-asset-conditioned"],
        "refany3d": facts,
    }
    flags = "\n".join(f"| `{flag}` | `{config[flag]!r}` |" for flag in MODEL_FLAGS)
    tiny = " (the embedded tiny random-weight model: this checkpoint shows the pipeline, not quality)"
    return (
        "---\n"
        + yaml.safe_dump(front, sort_keys=False)
        + "---\n\n"
        + f"# RefAny3D adapters, step {manifest['step']}\n\n"
        + "Reference- and Domain-LoRA (peft, `adapters/`) and the domain switcher of RefAny3D on "
        + f"`{base.get('name_or_path') or base.get('label')}`{tiny if not base.get('name_or_path') else ''}.\n"
        + (
            "`adapters/base_model.safetensors` holds the Flux weights, trained with them (`train_base`).\n"
            if config.get("train_base")
            else ""
        )
        + f"Trained on dataset version `{facts['dataset_version']}`; training losses at this step: "
        + (", ".join(f"{k} {v:.5g}" for k, v in facts["metrics"].items()) or "none")
        + ".\n\n| model flag (`config.json`) | value |\n|---|---|\n"
        + flags
        + "\n\nSample with it: `refany3d sample --lora <this directory> --asset mesh.glb --prompt ...` "
        + "(the model flags come from `config.json`), or from Python:\n\n```python\n"
        + "from refany3d.sampling import RefAny3DPipeline\n\n"
        + 'pipe = RefAny3DPipeline.from_pretrained("<this directory>")\n'
        + 'out = pipe("mesh.glb", "a prompt")  # out.images[0], out.point_maps[0]\n```\n'
    )


def read_config(checkpoint: str | Path) -> dict[str, Any] | None:
    """The config.json of a checkpoint directory (or of the checkpoint an `adapters/` directory is
    in; any fsspec URL); None for a checkpoint written before checkpoints had one."""
    fs, root = url_to_fs(str(checkpoint))
    root = root.rstrip("/")
    parent = root.rsplit("/", 1)[0]
    for path in (join(root, CONFIG), *([join(parent, CONFIG)] if root.endswith("/adapters") else [])):
        if fs.isfile(path):
            return json.loads(fs.cat_file(path))
    return None


def settings_from_config(
    model: ModelSettings,
    config: dict[str, Any] | None,
    explicit: frozenset[str] | set[str],
    where: str,
    flags: tuple[str, ...] = MODEL_FLAGS,
    fix: str = "drop the override (the checkpoint's config.json sets it)",
) -> tuple[ModelSettings, list[str]]:
    """`model` with the checkpoint's `flags` from `config` (its config.json), and the flags it
    changed. A flag the user set (`model.<flag>` in `explicit`) to another value than the
    checkpoint's is a SettingsError naming it: the adapters were trained with the checkpoint's."""
    if not config:
        return model, []
    changes = {}
    for flag in flags:
        if flag not in config or getattr(model, flag) == config[flag]:
            continue
        if f"model.{flag}" in explicit:
            raise SettingsError(
                f"model.{flag}: {getattr(model, flag)!r} was asked, but {where} was trained with "
                f"{config[flag]!r}; {fix}"
            )
        changes[f"model.{flag}"] = config[flag]
    merged = override(model, **{k.removeprefix("model."): v for k, v in changes.items()})
    return merged, [f"{k}={v!r}" for k, v in changes.items()]


def save_checkpoint(
    out: str,
    model: RefAny3DTransformer,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    step: int,
    position: int,
    facts: dict[str, Any],
    keep: int,
    config: dict[str, Any] | None = None,
) -> CheckpointInfo:
    """Write the checkpoint of `step` (call on one process only) and prune to the `keep` newest;
    `config`: its config.json (`model_config`)."""
    name = f"step-{step:08d}"
    plain, tensors = rng_states()
    manifest = {"format": FORMAT, "step": step, "position": position, "dir": name, **facts}
    with tempfile.TemporaryDirectory(prefix="refany3d-ckpt-") as tmp:
        local = Path(tmp) / name
        base_id = (config or {}).get("base", {}).get("name_or_path") or (config or {}).get("base", {}).get(
            "label", ""
        )
        save_adapters(model, local / "adapters", base_id)
        if config is not None:
            (local / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
            (local / MODEL_CARD).write_text(model_card(config, manifest))
        (local / "optimizer.pt").write_bytes(_torch_bytes(optimizer.state_dict()))
        (local / "lr_scheduler.pt").write_bytes(_torch_bytes(lr_scheduler.state_dict()))
        (local / "rng.json").write_text(json.dumps(plain))
        (local / "rng.safetensors").write_bytes(save_tensors(tensors))
        manifest["files"] = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
        manifest["digests"] = {f: _digest((local / f).read_bytes()) for f in manifest["files"]}
        (local / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        fs, root = url_to_fs(out)
        final = join(root, CHECKPOINTS, name)
        staging = join(root, CHECKPOINTS, f".tmp-{name}")
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        if fs.exists(final):  # a rerun of the same step replaces it
            fs.rm(final, recursive=True)
        if atomic_rename(fs):
            fs.makedirs(join(root, CHECKPOINTS), exist_ok=True)
            fs.put(str(local), staging, recursive=True)
            fs.mv(staging, final, recursive=True)
        else:  # an object store has no rename: the files go to their own keys, and the checkpoint
            fs.put(str(local), final, recursive=True)  # list written next is the marker readers trust
    entries = [c.manifest for c in list_checkpoints(out) if c.step != step] + [manifest]
    entries.sort(key=lambda e: e["step"])
    _write_list(out, entries[-keep:])
    for stale in entries[:-keep]:
        fs.rm(join(root, CHECKPOINTS, stale["dir"]), recursive=True)
    return CheckpointInfo(step, position, join(out, CHECKPOINTS, name), manifest)


def _digest(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def damage(info: CheckpointInfo) -> str | None:
    """What is wrong with the checkpoint's files (missing, a size or sha256 that differs from its
    manifest), in a few words; None when it is intact."""
    fs, root = url_to_fs(info.url)
    try:
        manifest = json.loads(fs.cat_file(join(root, MANIFEST)))
    except (FileNotFoundError, ValueError):
        return f"{MANIFEST} missing or unreadable"
    for name in manifest.get("files", []):  # older manifests may list none
        path = join(root, name)
        if not fs.exists(path):
            return f"{name} missing"
        want = manifest.get("digests", {}).get(name)
        if want is None:  # a checkpoint written before digests: presence is all it records
            continue
        data = fs.cat_file(path)
        if len(data) != want["size"]:
            return f"{name} is {len(data)} bytes, its manifest says {want['size']}"
        if hashlib.sha256(data).hexdigest() != want["sha256"]:
            return f"{name} does not match its sha256"
    return None


def newest_intact(found: list[CheckpointInfo], warn) -> CheckpointInfo | None:
    """The newest of `found` whose files match its manifest; `warn(line)` for each damaged one."""
    for info in reversed(found):
        problem = damage(info)
        if problem is None:
            return info
        warn(f"checkpoint step {info.step} ({info.url}) is damaged: {problem}; using an older one")
    return None


def _write_list(out: str, entries: list[dict[str, Any]]) -> None:
    fs, root = url_to_fs(out)
    slim = [{k: e[k] for k in ("step", "position", "dir")} for e in entries]
    write_atomic(fs, join(root, CHECKPOINTS, MANIFEST), json.dumps({"checkpoints": slim}, indent=2).encode())


def load_checkpoint(
    info: CheckpointInfo, model: RefAny3DTransformer, optimizer: torch.optim.Optimizer, lr_scheduler: Any
) -> dict[str, Any]:
    """Restore adapters, optimizer, LR scheduler and RNG states from `info`; returns its manifest."""
    fs, root = url_to_fs(info.url)
    manifest = json.loads(fs.cat_file(join(root, MANIFEST)))
    missing = [f for f in manifest["files"] if not fs.exists(join(root, f))]
    if missing:
        raise FileNotFoundError(f"checkpoint {info.url} is incomplete: missing {', '.join(missing[:3])}")
    with tempfile.TemporaryDirectory(prefix="refany3d-ckpt-") as tmp:
        fs.get(join(root, "adapters"), str(Path(tmp) / "adapters"), recursive=True)
        load_adapters(model, Path(tmp) / "adapters")
    device = next(model.parameters()).device
    optimizer.load_state_dict(
        torch.load(
            io.BytesIO(fs.cat_file(join(root, "optimizer.pt"))), map_location=device, weights_only=True
        )
    )
    lr_scheduler.load_state_dict(
        torch.load(io.BytesIO(fs.cat_file(join(root, "lr_scheduler.pt"))), weights_only=True)
    )
    set_rng_states(
        json.loads(fs.cat_file(join(root, "rng.json"))),
        load_tensors(fs.cat_file(join(root, "rng.safetensors"))),
    )
    return manifest


def copy_adapters(info: CheckpointInfo, dest: str | Path) -> Path:
    """The adapters of a checkpoint as a local directory (for sampling / export)."""
    fs, root = url_to_fs(info.url)
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    fs.get(join(root, "adapters"), str(dest), recursive=True)
    return dest


def resolve_adapters(lora: str | Path) -> tuple[Path, dict]:
    """(adapter directory, checkpoint manifest or {}) of `lora`: a promotion pointer
    (`promoted.json`, or the retraining directory holding it: its checkpoint), a training run
    (its newest checkpoint), one checkpoint (manifest.json + adapters/), or an adapter directory
    itself (what `save_adapters` writes). FileNotFoundError naming `--lora` otherwise."""
    root = Path(lora)
    pointer = root if root.is_file() else root / POINTER
    if pointer.is_file():
        try:
            root = Path(json.loads(pointer.read_text())["checkpoint"])
        except (ValueError, KeyError, TypeError):
            raise FileNotFoundError(f"--lora {str(lora)!r}: {pointer} is not a promotion pointer") from None
    if (root / CHECKPOINTS / MANIFEST).is_file():
        found = list_checkpoints(str(root))
        if not found:
            raise FileNotFoundError(f"--lora {str(root)!r}: the run has no finished checkpoint yet")
        intact = newest_intact(found, lambda line: print(f"warning: {line}", file=sys.stderr))
        if intact is None:
            raise FileNotFoundError(f"--lora {str(root)!r}: every checkpoint of the run is damaged")
        root = Path(intact.url)
    if (root / "adapters" / SWITCHER_WEIGHTS).is_file():
        manifest = json.loads((root / MANIFEST).read_text()) if (root / MANIFEST).is_file() else {}
        return root / "adapters", manifest
    if (root / SWITCHER_WEIGHTS).is_file():
        return root, {}
    raise FileNotFoundError(
        f"--lora {str(lora)!r}: not a promotion pointer ({POINTER}), a training run "
        f"(checkpoints/{MANIFEST}), a checkpoint (adapters/{SWITCHER_WEIGHTS}) or an adapter "
        f"directory ({SWITCHER_WEIGHTS})"
    )


def read_pointer(out: str) -> dict[str, Any] | None:
    """The promotion pointer of a retraining directory (`OUT/promoted.json`), None before the first."""
    fs, root = url_to_fs(out)
    path = join(root, POINTER)
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def write_pointer(out: str, record: dict[str, Any]) -> str:
    """Promote: atomically point `OUT/promoted.json` at `record["checkpoint"]`; returns its URL."""
    fs, root = url_to_fs(out)
    write_atomic(fs, join(root, POINTER), json.dumps(record, indent=2, sort_keys=True, default=str).encode())
    return join(out, POINTER)
