"""`--until mesh` through the build flow: the mesh stage runs after segment and fills `mesh_glb`."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
import trimesh

import refany3d.stages.mesh  # noqa: F401  on the main thread, as the CLI's preflight does (stages/mesh.py)
from refany3d.config import BuildSettings, override
from refany3d.flows.build_dataset import build_dataset

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def test_build_dataset_until_mesh_writes_textured_meshes(tmp_path, synthetic_source):
    out = tmp_path / "out"
    settings = override(
        BuildSettings(),
        **{
            "source.kind": "synthetic",
            "source.data_files": synthetic_source,
            "storage.out": str(out),
            "until": "mesh",
            "mesher.target_faces": 3000,
            "mesher.uv_atlas_size": 256,
            "mesher.truth_resolution": 48,
            "texturer.fit_resolution": 128,
        },
    )
    result = build_dataset(settings)
    stats = result["stats"]
    assert stats["mesh"]["in"] == stats["segment"]["kept"] > 0
    assert stats["mesh"]["kept"] == stats["mesh"]["in"]
    rows = [r for f in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == stats["mesh"]["kept"]
    for row in rows:
        mesh = trimesh.load(io.BytesIO(row["mesh_glb"]), file_type="glb", force="mesh")
        assert mesh.visual.kind == "texture" and 0 < len(mesh.faces) <= 3000
