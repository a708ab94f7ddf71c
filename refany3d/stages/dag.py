"""The build DAG: stage names, their parents, the settings sections that decide their output,
and the shard columns each one adds. No stage code is imported here, so it is cheap to read."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    parents: tuple[str, ...]
    sections: tuple[str, ...]  # BuildSettings sections whose values decide this stage's output
    columns: tuple[str, ...]  # shard columns this stage fills
    module: str  # refany3d.stages.<module>.<name> is the stage function


# Topological order. mesh and depth are independent branches after segment.
STAGES: dict[str, StageSpec] = {
    "source": StageSpec(
        (),
        ("source",),
        ("sample_id", "source", "source_id", "collection", "metrics", "backends", "truth"),
        "read_source",
    ),
    "quality": StageSpec(("source",), ("quality",), (), "filter_quality"),
    "split": StageSpec(
        ("quality",), ("split",), ("side", "image", "caption", "item", "category"), "split_pair"
    ),
    "detect": StageSpec(("split",), ("detector", "runtime"), ("box",), "detect"),
    "segment": StageSpec(("detect",), ("segmenter", "runtime"), ("mask",), "segment"),
    "mesh": StageSpec(("segment",), ("mesher", "runtime"), ("mesh_glb",), "mesh"),
    "depth": StageSpec(("segment",), ("depth", "runtime"), ("depth", "intrinsics"), "depth"),
    "pose": StageSpec(("mesh", "depth"), ("pose",), ("pose", "intrinsics", "mesh_scale"), "pose"),
    "verify": StageSpec(("pose",), ("verify",), ("mask_iou", "lpips"), "verify"),
    "render": StageSpec(
        ("verify",),
        ("render",),
        ("point_map", "point_map_raw", "views_rgb", "views_point_map", "view_azimuths_deg"),
        "render",
    ),
    "shard": StageSpec(("render",), ("storage",), (), "shard"),
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
