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


def test_the_mesh_task_takes_a_gpu_turn_per_forward_pass_and_none_over_its_last_objects(
    tmp_path, synthetic_source, monkeypatch
):
    # the slot is for the forward passes: held over the post-processing of the last chunk, it would
    # keep every other batch's GPU stage (and so the GPU) waiting on CPU work
    import contextlib
    import time

    from refany3d.flows import tasks
    from refany3d.stages import mesh as mesh_stage

    turns, kept = [], []

    def gpu_turns(stage, settings):
        @contextlib.contextmanager
        def turn():
            taken = time.monotonic()
            yield
            turns.append((stage, taken, time.monotonic()))

        return turn

    def keep(sample, done, ctx):
        kept.append(time.monotonic())
        return real_keep(sample, done, ctx)

    real_keep = mesh_stage._keep
    monkeypatch.setattr(tasks, "_gpu_turns", gpu_turns)
    monkeypatch.setattr(mesh_stage, "_keep", keep)
    settings = override(
        BuildSettings(),
        **{"source.kind": "synthetic", "source.data_files": synthetic_source, "storage.out": str(tmp_path),
           "until": "mesh", "source.limit": 1, "mesher.batch_size": 1, "mesher.target_faces": 3000,
           "mesher.uv_atlas_size": 256, "mesher.truth_resolution": 48, "texturer.fit_resolution": 128},
    )  # fmt: skip
    assert build_dataset(settings)["stats"]["mesh"]["kept"] == len(kept) == 2
    mesh_turns = [t for t in turns if t[0] == "mesh"]
    assert len(mesh_turns) == 2  # one per chunk of one object
    assert mesh_turns[-1][2] < max(kept)  # given back while the last object was still being finished
