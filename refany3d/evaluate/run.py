"""Evaluate a directory of generated samples: per-sample metrics, their means, metrics.json.

A sample is a directory that `refany3d sample` wrote (`sample.json`, `image.png`,
`point_map16.png` or `point_map.png`, `asset.glb`, `views/rgb_KK.png`). `--samples DIR` is one
sample or a directory of them. A sample without its own `asset.glb` / views takes them from the
dataset (`--dataset URL`, shards) through the `sample_id` in its sample.json. metrics.json goes to
`--out URL` (default: the samples directory), a local directory or an object store.

Which metric means what (range, direction) is in `METRICS`; `docs/evaluate.md` explains them.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trimesh
from PIL import Image

from refany3d.config import EvaluateSettings, to_dict
from refany3d.evaluate.geometry import geometry_metrics, point_map_foreground, rgb_silhouette
from refany3d.evaluate.semantic import (
    CLIP_METRICS,
    DINO_METRICS,
    clip_metrics,
    dino_metrics,
    load_scorer,
    remove_background,
    resolve_weights,
)
from refany3d.render.mesh import load_mesh
from refany3d.storage.fs import url_to_fs
from refany3d.storage.store import join, put_tree, write_atomic

SAMPLE_JSON = "sample.json"
METRICS_JSON = "metrics.json"
MEAN_OF = "mean covers"  # the table row of how many samples each mean is over

# name: (range, better, what it measures)
METRICS: dict[str, tuple[str, str, str]] = {
    "silhouette_iou": ("[0, 1]", "higher", "point-map foreground vs the RGB object's silhouette (GrabCut)"),
    "surface_distance": (
        "[0, inf)",
        "lower",
        "generated canonical coordinates to the asset surface / bbox diagonal",
    ),
    "texture_error": (
        "[0, 1]",
        "lower",
        "asset texture colour at each generated coordinate vs the RGB pixel",
    ),
    "clip_i_mean": ("[-1, 1]", "higher", "CLIP image similarity to the reference views, mean"),
    "clip_i_max": ("[-1, 1]", "higher", "CLIP image similarity to the reference views, best view"),
    "clip_t": ("[-1, 1]", "higher", "CLIP similarity of the image and the prompt"),
    "dino_mean": ("[-1, 1]", "higher", "DINOv2 similarity to the reference views, mean"),
    "dino_max": ("[-1, 1]", "higher", "DINOv2 similarity to the reference views, best view"),
}


# Why a metric of a sample can have no value (null in metrics.json); each null gets a note.
NULL_REASONS = {
    "silhouette_iou": "neither the point map nor the RGB image has a foreground",
    "surface_distance": "the point map has no foreground",
    "texture_error": "the asset has no texture or vertex colours, or no pixel is foreground in both "
    "the point map and the RGB silhouette",
}


@dataclass(frozen=True)
class GeneratedSample:
    """One sample read back: image (H, W, 3) uint8, point_map (H, W, 3) float in [0, 1], views
    N (R, R, 3) uint8 reference renders, mesh (the normalised asset), prompt."""

    name: str
    image: np.ndarray
    point_map: np.ndarray
    views: list[np.ndarray]
    mesh: trimesh.Trimesh
    prompt: str


def find_samples(root: str | Path) -> list[Path]:
    """Sample directories under `root` (itself, or its direct subdirectories), sorted by name."""
    root = Path(root)
    if (root / SAMPLE_JSON).is_file():
        return [root]
    found = sorted(p.parent for p in root.glob(f"*/{SAMPLE_JSON}"))
    if not found:
        raise FileNotFoundError(
            f"--samples {str(root)!r}: no {SAMPLE_JSON} there (write samples with `refany3d sample`)"
        )
    return found


def _read_point_map(directory: Path) -> np.ndarray:
    import cv2

    for name in ("point_map16.png", "point_map.png"):
        if (directory / name).is_file():
            raw = cv2.imread(str(directory / name), cv2.IMREAD_UNCHANGED)[..., ::-1]
            return raw.astype(np.float64) / (65535.0 if raw.dtype == np.uint16 else 255.0)
    raise FileNotFoundError(f"{directory}: no point_map16.png or point_map.png")


def read_sample(directory: Path, dataset: dict[str, dict[str, Any]] | None = None) -> GeneratedSample:
    """One sample directory; mesh and views from `dataset` rows (by sample_id) when it has none."""
    meta = json.loads((directory / SAMPLE_JSON).read_text())
    row = (dataset or {}).get(meta.get("sample_id", ""), {})
    if (directory / "asset.glb").is_file():
        mesh = load_mesh(directory / "asset.glb")
    elif row.get("mesh_glb"):
        mesh = load_mesh(row["mesh_glb"], file_type="glb")
    else:
        raise FileNotFoundError(
            f"{directory}: no asset.glb, and no dataset row for sample_id {meta.get('sample_id')!r}"
        )
    views = [np.array(Image.open(p).convert("RGB")) for p in sorted((directory / "views").glob("rgb_*.png"))]
    if not views and row.get("views_rgb"):
        views = [np.array(Image.open(io.BytesIO(v["bytes"])).convert("RGB")) for v in row["views_rgb"]]
    image = np.array(Image.open(directory / "image.png").convert("RGB"))
    return GeneratedSample(
        directory.name, image, _read_point_map(directory), views, mesh, meta.get("prompt", "")
    )


def dataset_rows(url: str, ids: set[str]) -> dict[str, dict[str, Any]]:
    """sample_id -> {mesh_glb, views_rgb} of the dataset shards at `url`, for `ids` only."""
    from refany3d.storage.shards import list_tables, read_rows

    rows = read_rows(list_tables(url), columns=["sample_id", "mesh_glb", "views_rgb"])
    return {r["sample_id"]: r for r in rows if r["sample_id"] in ids}


def scorers(settings: EvaluateSettings) -> tuple[dict[str, Any], list[str]]:
    """The CLIP / DINO scorers whose weights are present, and a note for each one skipped."""
    found, notes = {}, []
    for kind, setting, value, metrics in (
        ("clip", "metrics.clip_weights", settings.metrics.clip_weights, CLIP_METRICS),
        ("dino", "metrics.dino_weights", settings.metrics.dino_weights, DINO_METRICS),
    ):
        directory, note = resolve_weights(setting, value, metrics)
        if directory is None:
            notes.append(note)
        else:
            found[kind] = load_scorer(kind, directory, settings.metrics.device)
    return found, notes


def evaluate_sample(
    sample: GeneratedSample, settings: EvaluateSettings, models: dict[str, Any]
) -> dict[str, float]:
    """Every available metric of one sample (nan: no value, see `NULL_REASONS`)."""
    silhouette = rgb_silhouette(sample.image, settings.metrics.silhouette_border)
    foreground = point_map_foreground(sample.point_map, settings.metrics.silhouette_border)
    out = geometry_metrics(sample.image, sample.point_map, sample.mesh, silhouette, foreground).as_dict()
    if sample.mesh.visual.kind is None:  # no colours: the error against trimesh's default grey means nothing
        out["texture_error"] = float("nan")
    clean = remove_background(sample.image, foreground)
    if "clip" in models and sample.views:
        out.update(clip_metrics(models["clip"], clean, sample.views, sample.prompt))
    if "dino" in models and sample.views:
        out.update(dino_metrics(models["dino"], clean, sample.views))
    return out


def build_report(
    per_sample: dict[str, dict[str, float]], notes: list[str], settings: EvaluateSettings
) -> dict:
    """metrics.json's content: per-sample values (null where a sample has none, with a note per
    metric and sample), means over the samples that have a value and how many those are
    (`count`, of `len(samples)`), the metric docs, notes, the settings."""
    names = [m for m in METRICS if any(m in v for v in per_sample.values())]
    samples = {
        name: {m: None if _missing(x) else x for m, x in values.items()}
        for name, values in per_sample.items()
    }
    notes = list(notes)
    for name, values in samples.items():
        for m in names:
            if m in values and values[m] is None:
                notes.append(
                    f"{name}: {m} is null ({NULL_REASONS.get(m, 'no value')}); its mean leaves it out"
                )
    means, counts = {}, {}
    for m in names:
        values = [v[m] for v in samples.values() if v.get(m) is not None]
        means[m] = float(np.mean(values)) if values else None
        counts[m] = len(values)
    docs = {m: {"range": METRICS[m][0], "better": METRICS[m][1], "measures": METRICS[m][2]} for m in names}
    return {
        "samples": samples,
        "mean": means,
        "count": counts,
        "metrics": docs,
        "notes": notes,
        "settings": to_dict(settings),
    }


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def write_report(out: str | Path, report: dict, samples: Sequence[Path] = ()) -> str:
    """`report` as OUT/metrics.json, OUT a directory or any fsspec URL (`s3://...`); returns its
    URL. `samples` (local sample directories, the ones the run drew) are copied to OUT/<name>/
    first: metrics.json, one atomic write (on S3 one PUT) after them, is the marker that lists
    them (an object store has no rename; a reader trusts only what metrics.json names)."""
    for directory in samples:
        put_tree(directory, join(str(out), directory.name))
    fs, root = url_to_fs(str(out))
    # allow_nan=False: a bare NaN is not JSON (parsers reject it); build_report writes null instead
    text = json.dumps(report, indent=2, sort_keys=True, allow_nan=False)
    write_atomic(fs, join(root, METRICS_JSON), text.encode())
    return join(str(out), METRICS_JSON)


def metrics_table(report: dict) -> list[str]:
    """Printable lines: one row per sample, the mean and how many samples each mean covers, one
    column per metric (arrow = better; `-` = no value)."""
    names = list(report["mean"])
    arrow = {m: "↑" if METRICS[m][1] == "higher" else "↓" for m in names}
    width = max([len("sample"), len(MEAN_OF)] + [len(s) for s in report["samples"]])
    head = f"{'sample':{width}}  " + "  ".join(f"{m + arrow[m]:>17}" for m in names)
    rows = [head]
    for name, values in [*report["samples"].items(), ("mean", report["mean"])]:
        cells = ("-" if _missing(values.get(m)) else f"{values[m]:.4f}" for m in names)
        rows.append(f"{name:{width}}  " + "  ".join(f"{c:>17}" for c in cells))
    total = len(report["samples"])
    covers = (f"{report['count'][m]} of {total}" for m in names)
    rows.append(f"{MEAN_OF:{width}}  " + "  ".join(f"{c:>17}" for c in covers))
    return rows
