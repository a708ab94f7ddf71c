"""Samples of a dataset's assets drawn with a checkpoint's `RefAny3DPipeline`, for the evaluate
flow (`refany3d evaluate --generate`): each row's mesh and caption go through the pipeline as a
user's asset and prompt would, and the sample is written as `refany3d sample` writes it (plus the
row's `sample_id` in sample.json), ready to be scored."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from refany3d.config import SampleSettings
from refany3d.render.mesh import load_mesh
from refany3d.sampling.assets import AssetError


def dataset_assets(url: str, limit: int = 0) -> Iterator[dict[str, Any]]:
    """The rows of the shards at `url` that have a mesh (sample_id, caption, mesh_glb): the `limit`
    (0 = all) first by sample id, streamed in file order (one record batch of meshes in memory)."""
    from refany3d.storage.shards import list_tables, read_rows

    tables = list_tables(url)
    if not tables:
        raise FileNotFoundError(f"--dataset {url!r}: no Parquet shards under data/")
    ids = sorted(r["sample_id"] for r in read_rows(tables, ["sample_id", "mesh_glb"]) if r["mesh_glb"])
    chosen = set(ids[:limit] if limit else ids)
    for row in read_rows(tables, columns=["sample_id", "caption", "mesh_glb"]):
        if row["sample_id"] in chosen:
            yield row


def _dirname(sample_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", sample_id)


def generate_samples(
    checkpoint: str | os.PathLike | None,
    dataset: str,
    out: str | os.PathLike,
    settings: SampleSettings | None = None,
    limit: int = 0,
) -> tuple[list[Path], list[str]]:
    """(sample directories written under `out`, a note per row skipped) of the dataset's assets
    with the pipeline of `checkpoint` (None = untrained adapters: the base model's behaviour, the
    step-0 reference); model flags and sampling defaults from its config.json, `settings` for the
    rest. A row whose asset cannot be a condition (AssetError: a blank orbit view) is skipped."""
    from refany3d.sampling.pipeline import RefAny3DPipeline

    rows = dataset_assets(dataset, limit)
    pipe = RefAny3DPipeline.from_pretrained(checkpoint, settings=settings)
    written, notes = [], []
    for row in rows:
        try:
            sample = pipe(load_mesh(row["mesh_glb"], file_type="glb"), row["caption"] or "")
        except AssetError as err:
            notes.append(f"{row['sample_id']}: not generated ({err})")
            continue
        sample = dataclasses.replace(sample, provenance={**sample.provenance, "sample_id": row["sample_id"]})
        written.append(sample.save(Path(out) / _dirname(row["sample_id"]), pipe.settings))
    return written, notes
