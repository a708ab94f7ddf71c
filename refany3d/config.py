"""Typed settings for dataset builds and training: every threshold and default lives here.

Each flow has one frozen settings object (`BuildSettings`, `TrainSettings`) made of small frozen
sections. Values come, in increasing priority, from the defaults below, a YAML/TOML file, the
environment (`REFANY3D__SECTION__FIELD=value`) and the CLI (`--set section.field=value`).
Validation happens at construction, so a bad value fails before any work starts, with a message
naming the field and what it allows. Settings are never mutated: `override` returns a new object.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

ENV_PREFIX = "REFANY3D__"
T = TypeVar("T")


class SettingsError(ValueError):
    """A setting has a value outside what it allows; the message names the field."""


class _Section:
    """Base of every settings dataclass: validates its own fields at construction."""

    def __post_init__(self) -> None:
        _validate(self)


def _opt(default: Any, doc: str, **rules: Any) -> Any:
    """A settings field with a one-line doc and validation rules (ge, gt, le, lt)."""
    if isinstance(default, list | dict | tuple) and not isinstance(default, str):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **rules})
    return field(default=default, metadata={"doc": doc, **rules})


# --------------------------------------------------------------------------- build sections


@dataclass(frozen=True)
class SourceSettings(_Section):
    kind: Literal["synthetic", "subjects200k"] = _opt("synthetic", "where rows come from")
    data_files: str = _opt("", "glob or fsspec URL of Subjects200K-format Parquet files; empty = default")
    hub_id: str = _opt(
        "Yuanshi/Subjects200K", "Hugging Face dataset id, read as hf:// Parquet when no data_files"
    )
    limit: int = _opt(0, "stop after this many source rows (0 = all)", ge=0)
    synthetic_rows: int = _opt(8, "rows the synthetic source generates when no data_files are given", ge=1)
    seed: int = _opt(0, "seed of the synthetic source", ge=0)
    skip_bad_files: bool = _opt(
        False,
        "skip data files that are not Subjects200K Parquet (each a `bad_file` reject) instead of failing",
    )


@dataclass(frozen=True)
class QualitySettings(_Section):
    min_score: int = _opt(5, "keep rows whose three quality scores are all >= this", ge=0, le=5)


@dataclass(frozen=True)
class SplitSettings(_Section):
    min_view_size: int = _opt(64, "reject pairs whose derived view side S is smaller than this (px)", ge=1)
    max_view_size: int = _opt(
        2048,
        "reject pairs whose view side S is larger than this (px), read from the header before decoding",
        ge=1,
    )


@dataclass(frozen=True)
class DetectorSettings(_Section):
    backend: Literal["truth", "groundingdino", "hf-grounding-dino"] = _opt("truth", "detector backend")
    weights: str = _opt("", "local directory or hub id of the detector weights")
    text_encoder: str = _opt("", "groundingdino-py: local BERT directory (no hub access needed)")
    config: str = _opt("", "groundingdino-py: model config .py; empty = the package's SwinT-OGC config")
    image_size: int = _opt(
        800, "groundingdino-py: shorter image side fed to the model (its inference size)", ge=32
    )
    box_threshold: float = _opt(0.35, "minimum box score", ge=0.0, le=1.0)
    text_threshold: float = _opt(0.25, "minimum text-token score", ge=0.0, le=1.0)
    max_boxes: int = _opt(
        10, "highest-scoring candidate boxes per image given phrases (the rest are never kept)", ge=1
    )
    batch_size: int = _opt(8, "images per forward pass", ge=1)
    compile: bool = _opt(
        False,
        "hf-grounding-dino: torch.compile its layers on CUDA (-3.7 ms/image at batch 8, ~6 min compile)",
    )
    cuda_graphs: bool = _opt(
        True,
        "hf-grounding-dino: replay the text encoder, backbone, encoder and decoder from CUDA graphs, one per input shape (CUDA only; keeps GPU memory)",
    )
    truth_jitter: float = _opt(0.03, "truth backend: box corner jitter, fraction of box size", ge=0.0)
    truth_dilation: float = _opt(0.05, "truth backend: box dilation, fraction of box size", ge=0.0)


@dataclass(frozen=True)
class SegmenterSettings(_Section):
    backend: Literal["truth", "sam", "hf-sam"] = _opt("truth", "segmenter backend")
    weights: str = _opt("", "checkpoint file (sam) or local directory / hub id (hf-sam)")
    model_type: Literal["vit_h", "vit_l", "vit_b"] = _opt("vit_h", "sam backend: image encoder size")
    max_area_ratio: float = _opt(
        0.6, "drop masks covering more than this fraction of the image", gt=0.0, le=1.0
    )
    min_area_ratio: float = _opt(
        0.01, "drop masks covering less than this fraction of the image", ge=0.0, lt=1.0
    )
    max_components: int = _opt(3, "drop masks with more connected parts than this (fragmented)", ge=1)
    min_component_ratio: float = _opt(
        0.002, "parts smaller than this fraction of the mask are not counted", ge=0.0, lt=1.0
    )
    batch_size: int = _opt(8, "images per forward pass", ge=1)
    compile: bool = _opt(True, "sam backend: torch.compile the image-encoder blocks on CUDA (ignored on CPU)")
    cuda_graphs: bool = _opt(
        True,
        "sam backend: replay the image encoder from CUDA graphs, one per input shape (CUDA only; keeps GPU memory)",
    )
    truth_wobble_px: float = _opt(1.5, "truth backend: amplitude in px of the smooth boundary shift", ge=0.0)
    truth_bias_px: float = _opt(
        1.5, "truth backend: the whole mask grown or shrunk by up to this many px", ge=0.0
    )
    truth_ragged_px: float = _opt(1.0, "truth backend: amplitude in px of the ragged-edge noise", ge=0.0)
    truth_bleed_px: float = _opt(
        5.0, "truth backend: how far in px the mask bleeds onto the background on one stretch", ge=0.0
    )
    truth_bleed_arc: float = _opt(
        0.5,
        "truth backend: reach of that stretch along the boundary, fraction of the object's radius",
        ge=0.0,
    )


@dataclass(frozen=True)
class DepthSettings(_Section):
    backend: Literal["truth", "depth-pro"] = _opt("truth", "depth backend")
    weights: str = _opt("", "local directory or hub id (apple/DepthPro-hf)")
    batch_size: int = _opt(8, "images per forward pass", ge=1)
    compile: bool = _opt(True, "torch.compile the DINOv2 layers and fusion decoder on CUDA (ignored on CPU)")
    cuda_graphs: bool = _opt(
        True,
        "depth-pro: replay the whole network from CUDA graphs, one per input shape (CUDA only; keeps GPU memory)",
    )
    truth_scale_error: float = _opt(0.1, "truth backend: std of the global log-scale error", ge=0.0)
    truth_low_frequency: float = _opt(
        0.01, "truth backend: std of the smooth log-depth error field over the image", ge=0.0
    )
    truth_noise: float = _opt(0.01, "truth backend: relative per-pixel noise", ge=0.0)
    truth_flying_px: int = _opt(
        3, "truth backend: width in px of the depth smeared across the silhouette (flying pixels)", ge=0
    )
    truth_backdrop_min: float = _opt(
        1.15,
        "truth backend: nearest backdrop depth, multiple of the object's farthest (0 = no backdrop, depth 0 off the object)",
        ge=0.0,
    )
    truth_backdrop_max: float = _opt(
        2.0, "truth backend: farthest backdrop depth, multiple of the object's farthest", ge=0.0
    )
    truth_focal_error: float = _opt(0.05, "truth backend: std of the log focal-length error", ge=0.0)


@dataclass(frozen=True)
class MesherSettings(_Section):
    backend: Literal["truth", "hunyuan3d"] = _opt("truth", "image-to-mesh backend")
    weights: str = _opt(
        "", "hunyuan3d: local directory (or cached hub id) laid out as the tencent/Hunyuan3D-2 snapshot"
    )
    dit: Literal["standard", "turbo"] = _opt(
        "standard", "hunyuan3d: DiT variant (hunyuan3d-dit-v2-0 or hunyuan3d-dit-v2-0-turbo subfolder)"
    )
    steps: int = _opt(0, "hunyuan3d: denoising steps; 0 = the variant's (standard 50, turbo 5)", ge=0)
    guidance: float = _opt(5.0, "hunyuan3d: guidance scale (CFG, or the turbo DiT's guidance embedding)")
    octree_resolution: int = _opt(384, "hunyuan3d: volume grid cells per side (<= 64 on the CPU)", ge=16)
    num_chunks: int = _opt(200000, "hunyuan3d: volume queries per decoder call", ge=1000)
    flashvdm: bool = _opt(False, "hunyuan3d: hierarchical FlashVDM volume decoding (one object at a time)")
    mc_algo: Literal["auto", "mc", "dmc", "torch"] = _opt(
        "auto",
        "hunyuan3d: surface extraction (mc skimage CPU, dmc diso, torch ours on the grid's device); "
        "auto = dmc on CUDA when diso imports, else torch on CUDA, else mc",
    )
    compile: bool = _opt(
        False,
        "hunyuan3d on CUDA: torch.compile the DiT and the dense geometry decoder (compiles on first use)",
    )
    batch_size: int = _opt(4, "objects per DiT batch (FlashVDM decodes them one at a time)", ge=1)
    post_processes: int = _opt(
        0,
        "processes that reduce, unwrap and texture the objects (shared by the stage's tasks in one "
        "worker; outputs do not depend on it); 0 = on the stage's own worker thread",
        ge=0,
    )
    timeout_s: float = _opt(
        600.0, "per-sample budget in seconds; over it the sample drops (mesh_timeout)", gt=0.0
    )
    target_faces: int = _opt(
        10000, "face count after reduction, before UV unwrapping (bench/results/mesh.md)", ge=100
    )
    coarse_factor: float = _opt(
        2.0,
        "reduction: meshoptimizer pre-pass down to this many times target_faces (where that is not "
        "manifold, 2x and 4x as many), then hy3dgen's FaceReducer (0 = FaceReducer alone, ~9 s "
        "from a 300k-face surface; bench/results/mesh.md)",
        ge=0.0,
    )
    uv_atlas_size: int = _opt(1024, "texture atlas side in px", ge=64)
    uv_unwrapper: Literal["xatlas", "open3d"] = _opt(
        "xatlas",
        "UV atlas: xatlas (deterministic, so reruns equal fresh builds) or open3d (UVAtlas; its layout "
        "changes from run to run)",
    )
    uv_partitions: int = _opt(4, "open3d unwrapper: compute_uvatlas parallel_partitions", ge=1)
    uv_chart_fraction: float = _opt(
        0.05,
        "xatlas unwrapper: largest chart's area as a fraction of the surface's (0 = no cap; capped "
        "charts unwrap several times faster, bench/results/mesh.md)",
        ge=0.0,
        le=1.0,
    )
    truth_rotation_deg: float = _opt(
        3.0, "truth backend: std of the canonical frame's rotation error per axis, degrees", ge=0.0
    )
    truth_resolution: int = _opt(
        64, "truth backend: grid cells per side of the re-meshed surface (marching cubes)", ge=16
    )


@dataclass(frozen=True)
class TexturerSettings(_Section):
    backend: Literal["projection"] = _opt("projection", "texturing of the reduced, unwrapped mesh")
    fov_deg: float = _opt(
        45.0, "vertical field of view of the front camera fitted to the mask, degrees", gt=0.0, lt=180.0
    )
    fit_resolution: int = _opt(256, "side in px of the silhouettes compared while fitting the camera", ge=32)
    fit_iterations: int = _opt(30, "silhouette-contour alignment iterations of the camera fit", ge=0)


@dataclass(frozen=True)
class PoseSettings(_Section):
    backend: Literal["builtin", "foundationpose"] = _opt("builtin", "6D pose estimator")
    weights: str = _opt("", "foundationpose: directory of its refiner and scorer weights")
    erosion_px: int = _opt(3, "mask erosion before back-projecting depth (edge pixels fly)", ge=0)
    cloud_points: int = _opt(800, "observed points kept for the coarse registration", ge=16)
    view_directions: int = _opt(84, "rotation hypotheses: view directions over the sphere", ge=1)
    in_plane_steps: int = _opt(6, "rotation hypotheses: rolls about the optical axis per direction", ge=1)
    icp_keep: int = _opt(24, "ICP-registered hypotheses ranked by ray-cast IoU and depth", ge=1)
    refine_candidates: int = _opt(6, "distinct coarse poses screened by a short render-and-compare", ge=1)
    screen_iterations: int = _opt(5, "render-and-compare iterations of the screening pass", ge=0)
    finish_candidates: int = _opt(2, "best screened poses refined to the end", ge=1)
    refine_iterations: int = _opt(15, "render-and-compare Levenberg-Marquardt iterations to finish", ge=0)
    cube_turn_candidates: int = _opt(
        2,
        "of the best screened pose's other cube turns (a box whose sides are within 15 %), the best-scoring refined too",
        ge=0,
    )
    sweep_candidates: int = _opt(
        2,
        "of the best answers turned 10-30 degrees about the mesh's axes of revolution, the best screened refined too",
        ge=0,
    )
    grid_cells: int = _opt(48, "depth-comparison grid samples along the mask box's longer side", ge=4)
    band_px: float = _opt(
        10.0, "half-width in px of the mask-boundary band compared at full resolution", gt=0.0
    )
    depth_sigma: float = _opt(
        0.01, "depth residual scale, fraction of the object's size (robust loss)", gt=0.0
    )
    silhouette_sigma_px: float = _opt(1.0, "silhouette residual scale in px (robust loss)", gt=0.0)
    outlier_tolerance: float = _opt(
        0.03,
        "in-mask depth farther than this fraction of the object's size from the fit is an outlier",
        gt=0.0,
    )
    min_score: float = _opt(
        0.3, "estimates scoring below this (IoU x depth inliers) count as not found", ge=0.0, le=1.0
    )


@dataclass(frozen=True)
class VerifySettings(_Section):
    min_iou: float = _opt(
        0.8, "keep samples whose rendered-mask IoU with the SAM mask is above this", ge=0.0, le=1.0
    )
    max_lpips: float = _opt(0.3, "keep samples whose LPIPS to the image crop is below this", ge=0.0)
    max_depth_offset: float = _opt(
        0.05,
        "drop samples whose median depth in the mask's interior is farther than this fraction of the object's size from the posed mesh's",
        ge=0.0,
    )
    min_depth_inliers: float = _opt(
        0.6,
        "drop samples where fewer of the mask's interior pixels than this agree with the posed mesh's depth",
        ge=0.0,
        le=1.0,
    )
    depth_tolerance: float = _opt(
        0.05, "depth agreement band, fraction of the object's size (plus 3 sigma of the depth noise)", gt=0.0
    )
    min_pose_margin: float = _opt(
        0.25,
        "drop samples whose pose explains the pixels where it and the estimator's closest different answer "
        "differ less than this much better (pose_margin, -1..1)",
        ge=-1.0,
        le=1.0,
    )
    lpips_net: Literal["alex", "vgg"] = _opt("alex", "LPIPS backbone")
    lpips_weights: str = _opt(
        "",
        "LPIPS weights file (scripts/convert_lpips.py output); empty = <python prefix>/share/refany3d/lpips_<net>.safetensors, made by scripts/setup.sh",
    )
    lpips_size: int = _opt(224, "side in px that both object crops are resized to for LPIPS", ge=32)
    crop_margin: float = _opt(
        0.1, "margin around the union of both masks in the LPIPS crops, fraction of its side", ge=0.0
    )


@dataclass(frozen=True)
class RenderSettings(_Section):
    resolution: int = _opt(512, "side of every rendered view in px", ge=16)
    views: int = _opt(8, "orbit views per asset (equal azimuth steps)", ge=1)
    elevation_deg: float = _opt(20.0, "orbit camera elevation in degrees", ge=-89.0, le=89.0)
    distance: float = _opt(
        4.0,
        "orbit camera distance, object normalised to [-1, 1] (at fov 40: 2.8 cut the object in 46 of 48 synthetic views, 4.0 in none)",
        gt=0.0,
    )
    fov_deg: float = _opt(40.0, "orbit camera vertical field of view in degrees", gt=0.0, lt=180.0)
    turntable: bool = _opt(False, "also write a turntable video (mp4: RGB | point map)")
    turntable_frames: int = _opt(36, "turntable video frames (one full turn)", ge=2)
    turntable_resolution: int = _opt(256, "side of each half of a turntable frame in px", ge=16)
    turntable_fps: int = _opt(12, "turntable video frame rate", ge=1)
    orbit_shading: Literal["albedo", "lit"] = _opt(
        "albedo", "orbit-view shading: unlit base colour (fast on CPU GL) or lit PBR"
    )
    antialias: bool = _opt(False, "multisampled colour (one more depth pass per view for exact geometry)")


@dataclass(frozen=True)
class StorageSettings(_Section):
    out: str = _opt("out/dataset", "output URL (any fsspec URL) for shards, rejects, card, stats")
    artifacts: str = _opt("", "artifact store URL; empty = OUT/artifacts")
    shard_size: int = _opt(64, "samples per Parquet shard", ge=1)


@dataclass(frozen=True)
class RuntimeSettings(_Section):
    device: str = _opt(
        "cpu",
        "torch device for models: cpu, cuda, cuda:N (an error without CUDA); training: auto (cuda, else cpu)",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = _opt("float32", "model precision on the device")
    batch_size: int = _opt(32, "source rows per flow batch (one task per stage and batch)", ge=1)
    batches_in_flight: int = _opt(4, "batches submitted at once; bounds the flow's memory", ge=1)
    gpu_slots: int = _opt(
        1,
        "GPU stage tasks at once on one machine: its Prefect limit `gpu-<host name>`, created with this "
        "size where missing (an existing one keeps its size)",
        ge=1,
    )
    workers: int = _opt(
        2, "stage tasks at once: threads of the thread runner, worker processes of a local dask cluster", ge=1
    )
    switch_interval_ms: float = _opt(
        5.0,
        "how long a thread keeps the GIL while another waits for it (sys.setswitchinterval; Python's "
        "default 5 ms): every torch op releases it, so a stage thread launching GPU kernels waits this long "
        "per op whenever another thread runs Python",
        gt=0.0,
    )
    runner: Literal["thread", "dask"] = _opt("thread", "task runner for in-flow fan-out")
    dask_address: str = _opt("", "dask scheduler address; empty = local cluster")


@dataclass(frozen=True)
class BuildSettings(_Section):
    """Everything a dataset build needs; one frozen object per build."""

    name: str = _opt("", "dataset name (flow run name, card title); empty = refany3d-<source.kind>")
    until: str = _opt("shard", "last stage to run (its ancestors run too)")
    source: SourceSettings = field(default_factory=SourceSettings)
    quality: QualitySettings = field(default_factory=QualitySettings)
    split: SplitSettings = field(default_factory=SplitSettings)
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    segmenter: SegmenterSettings = field(default_factory=SegmenterSettings)
    depth: DepthSettings = field(default_factory=DepthSettings)
    mesher: MesherSettings = field(default_factory=MesherSettings)
    texturer: TexturerSettings = field(default_factory=TexturerSettings)
    pose: PoseSettings = field(default_factory=PoseSettings)
    verify: VerifySettings = field(default_factory=VerifySettings)
    render: RenderSettings = field(default_factory=RenderSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    @property
    def dataset_name(self) -> str:
        return self.name or f"refany3d-{self.source.kind}"


# --------------------------------------------------------------------------- train sections


@dataclass(frozen=True)
class DataSettings(_Section):
    shards: str = _opt("out/dataset/data/*.parquet", "glob or fsspec URL of training shards")
    resolution: int = _opt(512, "target image side in px", ge=16)
    condition_resolution: int = _opt(512, "condition view side in px (256 = compact option)", ge=16)
    drop_text_prob: float = _opt(0.1, "probability of an empty prompt", ge=0.0, le=1.0)
    drop_references_prob: float = _opt(0.1, "probability of zeroing all reference views", ge=0.0, le=1.0)
    num_workers: int = _opt(0, "data loader processes", ge=0)
    cache: str = _opt("", "latent + text-embedding cache URL; empty = <dataset>/cache (shared by runs)")
    holdout_fraction: float = _opt(
        0.0,
        "fraction of samples held out of training for evaluation, picked by a hash of the sample id (stable across dataset versions)",
        ge=0.0,
        lt=1.0,
    )


@dataclass(frozen=True)
class ModelSettings(_Section):
    """The RefAny3D network; each ablation switch of the paper's §4.3 is one flag."""

    pretrained: str = _opt(
        "", "FLUX.1-dev snapshot directory (or hub id in the local HF cache); empty = tiny random model"
    )
    text_tokens: int = _opt(0, "T5 tokens per prompt; 0 = 512 for FLUX.1-dev, 16 for the tiny model", ge=0)
    lora_rank: int = _opt(16, "rank of both LoRA adapters", ge=1)
    lora_alpha: float = _opt(16.0, "alpha of both LoRA adapters", gt=0.0)
    num_views: int = _opt(8, "condition views (RGB + point map each)", ge=0)
    shared_positions: bool = _opt(True, "target point map reuses the RGB ids; conditions shifted on width")
    text_agnostic: bool = _opt(True, "target point map does not attend to text")
    domain_lora: bool = _opt(True, "Domain-LoRA on point-map tokens")
    point_map_branch: bool = _opt(True, "generate the target point map jointly")
    attention: Literal["flex", "grouped", "dense"] = _opt("flex", "group-attention implementation")
    sdpa_kernel: Literal["flash", "cudnn"] = _opt(
        "flash",
        "SDPA kernel tried first by grouped/dense attention (cudnn: cuDNN's fused attention, faster on Hopper; "
        "where it refuses a shape the next takes it)",
    )
    gradient_checkpointing: bool = _opt(True, "recompute block activations in backward")
    checkpoint_saves_attention: bool = _opt(
        True, "keep attention outputs through checkpointing instead of recomputing them (grouped/dense)"
    )
    compile_blocks: bool = _opt(True, "torch.compile the block functions on CUDA (fuses elementwise ops)")
    independent_conditions: bool = _opt(
        False,
        "condition tokens attend to their own view pair only (not text/targets): sampling computes their keys/values once",
    )
    fp8_base: bool = _opt(
        False,
        "frozen base linears of the blocks in FP8 (e4m3, CUDA capability >= 8.9; elsewhere bf16/fp32 and a log line)",
    )
    train_base: bool = _opt(
        False,
        "train every Flux weight with the adapters (a small model from scratch, e.g. bench/learn_bench.py's "
        "check; checkpoints then hold the base too; use runtime.dtype=float32)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_base and self.fp8_base:
            raise SettingsError("model.train_base: an FP8 base cannot train; turn model.fp8_base off")


@dataclass(frozen=True)
class OptimSettings(_Section):
    optimizer: Literal["prodigy", "prodigyopt", "adamw"] = _opt(
        "prodigy", "optimizer (prodigy: prodigyopt's update, fused step; prodigyopt: the library's step)"
    )
    lr: float = _opt(1.0, "learning rate (1.0 for Prodigy)", gt=0.0)
    weight_decay: float = _opt(0.01, "weight decay", ge=0.0)
    grad_clip: float = _opt(0.5, "gradient norm clip", gt=0.0)
    batch_size: int = _opt(1, "samples per device per step", ge=1)
    steps: int = _opt(30000, "optimisation steps", ge=1)
    seed: int = _opt(0, "training seed: sample order, dropout and noise draws, adapter init", ge=0)
    gradient_accumulation: int = _opt(1, "micro-batches per optimisation step (per device)", ge=1)
    warmup_steps: int = _opt(0, "linear learning-rate warm-up steps (Prodigy has its own safeguard)", ge=0)


@dataclass(frozen=True)
class CheckpointSettings(_Section):
    dir: str = _opt("out/train", "checkpoint and sample directory (fsspec URL)")
    every: int = _opt(1000, "save every N steps", ge=1)
    keep: int = _opt(3, "checkpoints to keep", ge=1)
    sample_every: int = _opt(1000, "sample the validation prompts every N steps", ge=1)
    sample_steps: int = _opt(28, "denoising steps when sampling", ge=1)
    guidance: float = _opt(3.5, "guidance embedding when sampling", ge=0.0)
    sample_count: int = _opt(2, "dataset samples whose references and captions the previews use", ge=1)
    log_every: int = _opt(10, "log loss / learning rate / samples per second every N steps", ge=1)
    init_adapters: str = _opt(
        "",
        "adapters a fresh run starts from (a run, checkpoint, adapter directory or promotion pointer); empty = new",
    )
    report_to: Literal["none", "tensorboard"] = _opt(
        "none",
        "experiment tracker (accelerate): tensorboard = loss terms, lr, grad norm, samples/s and previews",
    )
    logging_dir: str = _opt(
        "", "tracker directory (local); empty = DIR/tensorboard (a remote checkpoint.dir needs one)"
    )


@dataclass(frozen=True)
class RetrainSettings(_Section):
    """The scheduled retraining of the `train` flow: warm start, held-out evaluation, promotion."""

    warm_start: bool = _opt(
        True, "start a new dataset version's run from the promoted adapters (false = fresh)"
    )
    eval_samples: int = _opt(
        8, "held-out samples (data.holdout_fraction) each candidate is evaluated on", ge=1
    )
    tolerance: float = _opt(
        0.0,
        "a metric may be this much worse than the promoted run's without counting as a regression",
        ge=0.0,
    )


@dataclass(frozen=True)
class TrainSettings(_Section):
    """Everything a training run needs; one frozen object per run."""

    name: str = _opt("refany3d-lora", "run name")
    processes: int = _opt(
        1, "data-parallel ranks the train flow launches with torchrun (1 = in the flow's own process)", ge=1
    )
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    retrain: RetrainSettings = field(default_factory=RetrainSettings)


# --------------------------------------------------------------------------- sample / evaluate sections


@dataclass(frozen=True)
class SamplerSettings(_Section):
    steps: int = _opt(28, "flow-matching Euler denoising steps", ge=1)
    guidance: float = _opt(3.5, "FLUX.1-dev guidance embedding", ge=0.0)
    image_guidance: float = _opt(
        1.0,
        "image guidance S: v_blank + S (v_ref - v_blank), a second pass with blank references; 1 = off",
        ge=0.0,
    )
    seed: int = _opt(0, "seed of the initial noise", ge=0)
    resolution: int = _opt(512, "generated image side in px (a multiple of 16)", ge=16)
    cache_conditions: bool = _opt(
        True, "with model.independent_conditions: compute the condition keys/values once per image"
    )


@dataclass(frozen=True)
class SampleSettings(_Section):
    """Everything `refany3d sample` needs: the sampler, the network, the condition renders."""

    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    render: RenderSettings = field(default_factory=RenderSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)


@dataclass(frozen=True)
class MetricsSettings(_Section):
    clip_weights: str = _opt(
        "",
        "local CLIP directory (transformers CLIPModel + processor) or cached hub id; empty = CLIP metrics skipped",
    )
    dino_weights: str = _opt(
        "",
        "local DINOv2 directory (transformers Dinov2Model + processor) or cached hub id; empty = DINO skipped",
    )
    silhouette_border: float = _opt(
        0.02,
        "GrabCut (RGB silhouette and point-map foreground): image border (fraction of the side) taken as background",
        gt=0.0,
        lt=0.5,
    )
    gallery_samples: int = _opt(8, "contact sheets in the Prefect gallery artifact", ge=0)
    device: str = _opt("cpu", "torch device of the CLIP/DINO models")


@dataclass(frozen=True)
class EvaluateSettings(_Section):
    """Everything `refany3d evaluate` needs."""

    metrics: MetricsSettings = field(default_factory=MetricsSettings)


# --------------------------------------------------------------------------- loading


def _validate(obj: Any, prefix: str = "") -> None:
    """Check every field of a settings dataclass against its type and rules."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        name, value, hint = f"{prefix}{f.name}", getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise SettingsError(f"{name}: expected a section, got {value!r}")
            continue  # sections validate themselves in their own __post_init__ or below
        if typing.get_origin(hint) is Literal:
            allowed = typing.get_args(hint)
            if value not in allowed:
                raise SettingsError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")
            continue
        base = bool if hint is bool else hint
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(obj, f.name, float(value))
            value = float(value)
        if not isinstance(value, base) or (base is int and isinstance(value, bool)):
            raise SettingsError(f"{name}: expected {base.__name__}, got {value!r}")
        for rule, bound in f.metadata.items():
            ok = {
                "ge": lambda v, b: v >= b,
                "gt": lambda v, b: v > b,
                "le": lambda v, b: v <= b,
                "lt": lambda v, b: v < b,
            }.get(rule)
            if ok is not None and not ok(value, bound):
                sign = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[rule]
                raise SettingsError(f"{name}: {value!r} is out of range; allowed: {sign} {bound}")


def _coerce(text: str, hint: Any, name: str) -> Any:
    """Turn an override string (CLI or environment) into the field's type."""
    if hint is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}: {text!r} is not a boolean; allowed: true, false")
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise SettingsError(f"{name}: {text!r} is not a valid {hint.__name__}") from None
    if typing.get_origin(hint) is Literal:
        args = typing.get_args(hint)
        if args and isinstance(args[0], int | float) and not isinstance(args[0], bool):
            return _coerce(text, type(args[0]), name)
    return text


def _merge(cls: type, base: Any, updates: Mapping[str, Any], prefix: str = "") -> Any:
    """Return a new dataclass of `cls` from `base` with nested `updates` applied."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(updates) - known
    if unknown:
        raise SettingsError(
            f"{prefix}{sorted(unknown)[0]}: unknown setting; allowed: {', '.join(sorted(known))}"
        )
    changes: dict[str, Any] = {}
    for key, value in updates.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise SettingsError(f"{prefix}{key}: expected a section (mapping), got {value!r}")
            changes[key] = _merge(hint, getattr(base, key), value, f"{prefix}{key}.")
        else:
            changes[key] = _coerce(value, hint, f"{prefix}{key}") if isinstance(value, str) else value
    try:
        return dataclasses.replace(base, **changes)
    except SettingsError as err:
        raise SettingsError(
            f"{prefix}{err}" if prefix and not str(err).startswith(prefix) else str(err)
        ) from None


def _nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SettingsError(f"{key}: {part} is a value, not a section")
        node[leaf] = value
    return out


def parse_overrides(pairs: Iterable[str]) -> dict[str, str]:
    """`["a.b=1", ...]` → `{"a.b": "1"}`; a pair without `=` is an error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--set {pair!r}: expected section.field=value")
        out[key.strip()] = value
    return out


def _parse_toml(path: Path, text: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # Python 3.11's message ends "(at line L, column C)"; later versions also set err.lineno.
        match = re.search(r"^(.*) \(at line (\d+), column (\d+)\)$", str(err))
        where, what = (f" at line {match[2]}, column {match[3]}", match[1]) if match else ("", str(err))
        raise SettingsError(f"config file {str(path)!r}: TOML syntax error{where}: {what}") from None


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SettingsError(f"config file {str(path)!r}: YAML syntax error{where}: {what}") from None


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) settings file into a nested dict."""
    p = Path(path)
    if not p.is_file():
        raise SettingsError(f"config file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SettingsError(f"config file {str(p)!r}: not UTF-8 text (byte {err.start})") from None
    data = _parse_toml(p, text) if p.suffix == ".toml" else _parse_yaml(p, text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {str(p)!r}: expected a mapping at the top level")
    return data


def _from_env(environ: Mapping[str, str], cls: type) -> dict[str, str]:
    """The `REFANY3D__SECTION__FIELD` variables that apply to `cls`: those whose section (or
    top-level field) `cls` has. One environment serves every command (the GPU image sets
    `REFANY3D__RUNTIME__DEVICE=cuda` for build, train and sample; `evaluate` has no `runtime`), so
    a variable of another command's section is not this command's; an unknown field of a section
    `cls` has is still an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            dotted = key[len(ENV_PREFIX) :].lower().replace("__", ".")
            if dotted.split(".")[0] in names:
                out[dotted] = value
    return out


def load_settings(
    cls: type[T],
    config_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build `cls` from defaults < file < environment < overrides (dotted keys). Unknown keys in
    the file or the overrides are errors; environment variables apply where `cls` has their
    section (`_from_env`)."""
    settings = cls()
    if config_file:
        settings = _merge(cls, settings, read_file(config_file))
    settings = _merge(cls, settings, _nest(_from_env(os.environ if environ is None else environ, cls)))
    if overrides:
        settings = _merge(cls, settings, _nest(overrides))
    return settings


def explicit_keys(
    cls: type,
    config_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> frozenset[str]:
    """The dotted keys that `load_settings` with these arguments takes from the user (the file, the
    environment, the overrides) rather than from the defaults."""

    def flat(tree: Mapping[str, Any], prefix: str = "") -> set[str]:
        keys = set()
        for key, value in tree.items():
            keys |= flat(value, f"{prefix}{key}.") if isinstance(value, Mapping) else {f"{prefix}{key}"}
        return keys

    keys = flat(read_file(config_file)) if config_file else set()
    keys |= set(_from_env(os.environ if environ is None else environ, cls))
    return frozenset(keys | set(overrides or {}))


def override(settings: T, **dotted: Any) -> T:
    """A new settings object with dotted-key changes: `override(s, **{"render.views": 4})`."""
    return _merge(type(settings), settings, _nest(dotted))


def to_dict(settings: Any) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def settings_hash(section: Any) -> str:
    """Stable short hash of a settings object or section (cache keys, card provenance)."""
    blob = json.dumps(dataclasses.asdict(section), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def describe(cls: type, settings: Any = None, prefix: str = "") -> list[tuple[str, Any, str, Any]]:
    """(dotted name, value in `settings` (default: the defaults), doc, default) for every field;
    used by `refany3d config`."""
    rows = []
    hints = typing.get_type_hints(cls)
    default = cls()
    settings = default if settings is None else settings
    for f in dataclasses.fields(cls):
        name, hint = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, getattr(settings, f.name), f"{name}.")
        else:
            doc = f.metadata.get("doc", "")
            rows.append((name, getattr(settings, f.name), doc, getattr(default, f.name)))
    return rows
