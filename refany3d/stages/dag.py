"""The build DAG: stage names, their parents, the settings sections that decide their output,
the shard columns each one adds, and how each is scheduled (GPU-bound, serial). No stage code is
imported here, so it is cheap to read."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

from refany3d.config import BuildSettings, SettingsError


def _never(settings: BuildSettings) -> bool:
    return False


def _always(settings: BuildSettings) -> bool:
    return True


def _pose_on_device(settings: BuildSettings) -> bool:
    """FoundationPose runs on the device; the built-in estimator on a CUDA device takes its GPU
    path (torch, float32 rasterisation), elsewhere the CPU path (numpy, Open3D)."""
    return settings.pose.backend != "builtin" or settings.runtime.device.startswith("cuda")


@dataclass(frozen=True)
class StageSpec:
    parents: tuple[str, ...]
    # What in BuildSettings decides this stage's output: whole sections ("detector") or single
    # fields ("source.seed"); fields that only schedule work (workers, batches in flight) are out.
    # The first one is the stage's own section (its `batch_size` is the model batch).
    sections: tuple[str, ...]
    columns: tuple[str, ...]  # shard columns this stage fills
    module: str  # refany3d.stages.<module>.<name> is the stage function
    # Runs a network: on CUDA, each of its forward passes takes a turn on a slot of its machine's
    # GPU limit (`gpu-<host>`, `StageContext.device`); its host work (reads, decodes, checks,
    # writes) holds none, so another batch's forward pass runs meanwhile.
    gpu: bool = False
    # One task at a time across the build: a shard task holds a whole shard in memory (its rows and
    # their Arrow table, ≈ 2 MB a sample), and two at once were the flow's largest peak.
    serial: bool = False
    truth_section: str = ""  # settings section whose `backend` may be `truth` (ground truth)
    # Fields naming weights files or directories: keys hash their files (`stages/keys.py`), not the
    # path, and these fields leave the hash of their section.
    weights: tuple[str, ...] = ()
    # Whether `runtime.device` and `runtime.dtype` decide the stage's output in a build of these
    # settings (a network runs on the device, and its numbers change with it).
    on_device: Callable[[BuildSettings], bool] = field(default=_never)


DEVICE_FIELDS = ("runtime.device", "runtime.dtype")
_SEED = "source.seed"  # `ctx.seed`: the per-sample noise of the networks and their truth backends

# Topological order. mesh and depth are independent branches after segment.
STAGES: dict[str, StageSpec] = {
    "source": StageSpec(
        (),
        (),  # a source batch's key covers its file's content and row range instead
        ("sample_id", "source", "source_id", "collection", "metrics", "backends", "truth"),
        "read_source",
    ),
    "quality": StageSpec(("source",), ("quality",), (), "filter_quality"),
    "split": StageSpec(
        ("quality",), ("split",), ("side", "image", "caption", "item", "category"), "split_pair"
    ),
    "detect": StageSpec(
        ("split",),
        ("detector", _SEED),
        ("box",),
        "detect",
        gpu=True,
        truth_section="detector",
        weights=("detector.weights", "detector.text_encoder", "detector.config"),
        on_device=_always,
    ),
    "segment": StageSpec(
        ("detect",),
        ("segmenter", _SEED),
        ("mask",),
        "segment",
        gpu=True,
        truth_section="segmenter",
        weights=("segmenter.weights",),
        on_device=_always,
    ),
    "mesh": StageSpec(
        ("segment",),
        ("mesher", "texturer", _SEED),
        ("mesh_glb",),
        "mesh",
        gpu=True,
        truth_section="mesher",
        weights=("mesher.weights",),
        on_device=_always,
    ),
    "depth": StageSpec(
        ("segment",),
        ("depth", _SEED),
        ("depth", "intrinsics"),
        "depth",
        gpu=True,
        truth_section="depth",
        weights=("depth.weights",),
        on_device=_always,
    ),
    "pose": StageSpec(
        ("mesh", "depth"),
        ("pose",),
        ("pose", "intrinsics", "mesh_scale"),
        "pose",
        gpu=True,
        weights=("pose.weights",),
        on_device=_pose_on_device,
    ),
    "verify": StageSpec(
        ("pose",),
        ("verify",),
        ("mask_iou", "lpips"),
        "verify",
        weights=("verify.lpips_weights",),  # LPIPS runs on the CPU
    ),
    "render": StageSpec(
        ("verify",),
        ("render",),
        ("point_map", "point_map_raw", "views_rgb", "views_point_map", "view_azimuths_deg"),
        "render",
    ),
    "shard": StageSpec(("render",), ("storage.shard_size",), (), "shard", serial=True),
}


def ancestors(stage: str) -> list[str]:
    """`stage` and every stage it depends on, in topological order."""
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    needed: set[str] = set()
    todo = [stage]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(STAGES[name].parents)
    return [s for s in STAGES if s in needed]


def build_stages(until: str) -> list[str]:
    """The stages a build that stops after `until` runs, in order; it always ends with `shard`."""
    return [s for s in ancestors(until) if s != "shard"] + ["shard"]


def plan_inputs(stage: str, until: str) -> tuple[str, ...]:
    """The stages whose results feed `stage` in a build that stops after `until` (the shard stage
    takes the last stage before it)."""
    if stage == "shard":
        return (next(s for s in reversed(ancestors(until)) if s != "shard"),)
    return STAGES[stage].parents


def check_until(settings: BuildSettings) -> None:
    """SettingsError unless `until` names a stage."""
    if settings.until not in STAGES:
        raise SettingsError(f"until: {settings.until!r} is not one of {', '.join(STAGES)}")


def truth_stages(settings: BuildSettings) -> list[str]:
    """Stages up to `until` whose network is replaced by its ground-truth (`truth`) backend."""
    return [
        s
        for s in ancestors(settings.until)
        if STAGES[s].truth_section and getattr(settings, STAGES[s].truth_section).backend == "truth"
    ]


def uses_truth(settings: BuildSettings) -> bool:
    """True when the build's output depends on ground-truth backends (its outputs must say so)."""
    return bool(truth_stages(settings))


def shard_columns(until: str) -> list[str]:
    """Shard columns available when the build stops after `until`."""
    cols: list[str] = []
    for name in ancestors(until):
        cols += [c for c in STAGES[name].columns if c not in cols]
    return cols


def is_available(name: str) -> bool:
    """Whether the module of stage `name` ships in this version."""
    return importlib.util.find_spec(f"refany3d.stages.{STAGES[name].module}") is not None


def stage_function(name: str) -> Callable:
    """The stage function `refany3d.stages.<module>.<module>`; a clear error if not built yet."""
    if not is_available(name):
        ready = [s for s in STAGES if is_available(s)]
        raise NotImplementedError(
            f"stage {name!r} is not available in this version of refany3d "
            f"(available: {', '.join(ready)}); choose an earlier stage with --until"
        )
    module = importlib.import_module(f"refany3d.stages.{STAGES[name].module}")
    return getattr(module, STAGES[name].module)
