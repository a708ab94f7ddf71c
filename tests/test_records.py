import io
import json

import datasets
import numpy as np
import pytest
from PIL import Image

from refany3d.config import override
from refany3d.records import SHARD_COLUMNS, SHARD_SCHEMA_VERSION, shard_schema
from refany3d.stages.dag import shard_columns
from refany3d.stages.render import render
from refany3d.stages.shard import shard
from refany3d.stages.verify import verify
from refany3d.storage.shards import list_tables
from refany3d.testing.posed import posed_samples

FINAL_ROW = [
    "sample_id", "caption", "item", "category", "source", "image", "mask", "point_map", "point_map_raw",
    "views_rgb", "views_point_map", "view_azimuths_deg", "pose", "intrinsics", "mesh_scale", "mesh_glb",
    "mask_iou", "lpips", "backends", "truth",
]  # fmt: skip


def test_shard_schema_version_2_holds_the_final_row():
    assert SHARD_SCHEMA_VERSION == 2
    names = [name for name, _, _ in SHARD_COLUMNS]
    assert set(FINAL_ROW) <= set(names) and set(FINAL_ROW) <= set(shard_columns("shard"))
    assert json.loads(shard_schema().metadata[b"refany3d"]) == {"shard_schema_version": 2}


@pytest.mark.slow
def test_shard_of_verified_renders_loads_with_datasets(tmp_path):
    samples, ctx, settings = posed_samples(tmp_path / "build", rows=1, size=128)
    samples = [s.replace(backends={"mesh": "truth", "pose": "builtin"}) for s in samples]
    settings = override(settings, **{"storage.out": str(tmp_path / "out"), "render.resolution": 64})
    rendered = render(verify(samples, settings, ctx).kept, settings, ctx).kept
    assert len(rendered) == len(samples)
    assert not shard(rendered, settings, ctx).dropped
    files = list_tables(settings.storage.out)
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert len(ds) == len(samples) and set(FINAL_ROW) <= set(ds.column_names)
    for name in ("image", "mask", "point_map"):
        assert isinstance(ds.features[name], datasets.Image)
    for name in ("views_rgb", "views_point_map"):
        assert isinstance(ds.features[name].feature, datasets.Image)
    row = ds[0]
    assert isinstance(row["point_map"], Image.Image) and row["point_map"].size == (128, 128)
    assert len(row["views_rgb"]) == 8 and row["views_point_map"][3].size == (64, 64)
    assert row["view_azimuths_deg"] == [45.0 * k for k in range(8)]
    assert row["truth"] is True and json.loads(row["backends"])["mesh"] == "truth"
    assert row["mask_iou"] > 0.95 and 0 <= row["lpips"] < settings.verify.max_lpips
    assert row["mesh_scale"] == pytest.approx(rendered[0].mesh_scale)
    assert len(row["pose"]) == 16 and len(row["intrinsics"]) == 9 and row["mesh_glb"][:4] == b"glTF"
    xyz = np.load(io.BytesIO(row["point_map_raw"]))["xyz"]
    assert xyz.shape == (128, 128, 3) and xyz.dtype == np.float32
