"""The synthetic source: Subjects200K rows that the foundation's reader and split stage take, and
ground truth that matches what was rendered."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from refany3d.code_fingerprints import module_closure, module_fingerprint
from refany3d.config import BuildSettings
from refany3d.render.cameras import backproject, invert_pose, project, transform_points
from refany3d.render.raycast import raycast_maps
from refany3d.stages.context import StageContext
from refany3d.stages.read_source import plan_batches, read_source, resolve_files
from refany3d.stages.split_pair import split_pair
from refany3d.storage.store import ArtifactStore
from refany3d.synthetic import ensure_synthetic, generate, read_truth
from refany3d.synthetic.build import MARKER, generator_fingerprint
from refany3d.synthetic.objects import OBJECTS, build_object

SIZE = 96


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    return root, ensure_synthetic(root, 4, 7, view_size=SIZE)


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_generate_is_deterministic(tmp_path):
    generate(str(tmp_path / "a"), 2, 3, view_size=48)
    generate(str(tmp_path / "b"), 2, 3, view_size=48)
    for sub in ("data", "truth"):
        name = f"{sub}/synthetic-00000.parquet"
        assert pq.read_table(tmp_path / "a" / name).equals(pq.read_table(tmp_path / "b" / name))


def test_generate_schema_matches_subjects200k(source):
    table = pq.read_table(resolve_files(source[1])[0])
    assert table.column_names == ["image", "collection", "quality_assessment", "description"]
    row = table.slice(0, 1).to_pylist()[0]
    assert set(row["image"]) == {"bytes", "path"}
    assert set(row["quality_assessment"]) == {"compositeStructure", "objectConsistency", "imageQuality"}
    assert set(row["description"]) == {
        "item",
        "description_0",
        "description_1",
        "category",
        "description_valid",
    }
    assert row["description"]["item"] in {spec.item for spec in OBJECTS}


def test_objects_cover_ten_textured_categories():
    assert len({spec.item for spec in OBJECTS}) >= 10
    for spec in OBJECTS:
        mesh = build_object(spec, np.random.default_rng(0))
        assert mesh.visual.kind == "texture" and mesh.bounds[0][1] == pytest.approx(0.0, abs=1e-9)


def test_rows_load_and_split_into_truth_views(source, tmp_path):
    root, pattern = source
    settings = BuildSettings()
    ctx = StageContext(store=ArtifactStore(str(tmp_path / "artifacts")))
    rows = []
    for batch in plan_batches(resolve_files(pattern), batch_size=3, source="synthetic"):
        rows += read_source(batch, settings, ctx).kept
    assert len(rows) == 4
    views = split_pair(rows, settings, ctx)
    assert not views.dropped and len(views.kept) == 8
    truth_files = {}
    for view in views.kept:
        url, _, row = view.source_ref.rpartition("#")
        truth = truth_files.setdefault(url, pq.read_table(url.replace("/data/", "/truth/")).to_pylist())
        rec = next(t for t in truth if t["row"] == int(row) and t["side"] == view.side)
        image = _decode(ctx.store.get(view.artifacts["image"]))
        assert image.shape == (SIZE, SIZE, 3)
        # The truth mask is where the object was rendered; the split view must be that render.
        mask = np.asarray(Image.open(io.BytesIO(rec["mask"]))) > 0
        assert mask.shape == (SIZE, SIZE) and 0.01 < mask.mean() < 0.8
        assert view.metrics["view_size"] == SIZE


def test_split_views_are_the_rendered_views_exactly(tmp_path):
    """Pixels of each split view equal the view the generator rendered (PNG: lossless)."""
    from refany3d.synthetic.build import _row

    root = str(tmp_path / "src")
    generate(root, 1, 11, view_size=64)
    settings = BuildSettings()
    ctx = StageContext(store=ArtifactStore(str(tmp_path / "artifacts")))
    batch = plan_batches(resolve_files(f"{root}/data/*.parquet"), 8, source="synthetic")[0]
    views = split_pair(read_source(batch, settings, ctx).kept, settings, ctx).kept
    pair = _decode(_row(0, 11, 64)[0]["image"]["bytes"])
    pad = 2 * pair.shape[0] - pair.shape[1]
    expected = {
        "left": pair[pad : pad + 64, pad : pad + 64],
        "right": pair[pad : pad + 64, 2 * pad + 64 : 2 * pad + 128],
    }
    for view in views:
        np.testing.assert_array_equal(_decode(ctx.store.get(view.artifacts["image"])), expected[view.side])
    # the padding is white and the views are not: the crop boxes hit the views, not the canvas
    assert (pair[:pad] == 255).all() and (expected["left"] != 255).any(axis=-1).mean() > 0.9


def test_read_truth_geometry_is_consistent(source):
    """Ray-casting the truth mesh at the truth pose reproduces the truth mask and depth."""
    _, pattern = source
    url = resolve_files(pattern)[0]
    for row, side in ((0, "left"), (2, "right")):
        truth = read_truth(f"{url}#{row}", side)
        assert truth.pose.shape == (4, 4) and truth.intrinsics.shape == (3, 3)
        assert truth.mask.dtype == bool and truth.depth.dtype == np.float32
        maps = raycast_maps(truth.mesh, truth.pose, truth.intrinsics, SIZE, SIZE)
        iou = (maps["mask"] & truth.mask).sum() / (maps["mask"] | truth.mask).sum()
        assert iou > 0.98
        both = maps["mask"] & truth.mask
        np.testing.assert_allclose(truth.depth[both], maps["depth"][both], rtol=1e-3)
        # back-projected truth depth lands on the mesh surface (in its own frame)
        pts = transform_points(
            backproject(truth.depth, truth.intrinsics)[truth.mask], invert_pose(truth.pose)
        )
        assert np.all(pts.min(0) > truth.mesh.bounds[0] - 1e-3) and np.all(
            pts.max(0) < truth.mesh.bounds[1] + 1e-3
        )
        uv = project(transform_points(truth.mesh.vertices, truth.pose), truth.intrinsics)
        assert np.all((uv > -0.5 * SIZE) & (uv < 1.5 * SIZE))


def test_read_truth_loads_mesh_on_first_use(source):
    """Readers of the mask or depth do not decode the textured mesh (cost, cyclic garbage)."""
    from refany3d.synthetic import truth as truth_module

    url = resolve_files(source[1])[0]
    truth_module._load_mesh.cache_clear()
    truth = read_truth(f"{url}#1", "left")
    assert truth_module._load_mesh.cache_info().misses == 0
    assert len(truth.mesh.faces) > 0
    assert truth_module._load_mesh.cache_info().misses == 1


def test_read_truth_rejects_bad_refs(source):
    url = resolve_files(source[1])[0]
    with pytest.raises(ValueError):
        read_truth(f"{url}#0", "middle")
    with pytest.raises(ValueError):
        read_truth(url, "left")
    with pytest.raises(KeyError):
        read_truth(f"{url}#99", "left")


def test_ensure_synthetic_is_idempotent(source):
    root, pattern = source
    before = {p.name: p.stat().st_mtime_ns for p in (Path(root) / "data").iterdir()}
    assert ensure_synthetic(root, 4, 7, view_size=SIZE) == pattern
    after = {p.name: p.stat().st_mtime_ns for p in (Path(root) / "data").iterdir()}
    assert before == after and (Path(root) / MARKER).exists()


def test_ensure_synthetic_regenerates_after_a_generator_code_change(tmp_path):
    root = str(tmp_path / "src")
    ensure_synthetic(root, 1, 0, view_size=32, code="before")
    data = next((tmp_path / "src" / "data").iterdir())
    stamp = data.stat().st_mtime_ns
    ensure_synthetic(root, 1, 0, view_size=32, code="before")
    assert data.stat().st_mtime_ns == stamp  # same code: reused
    ensure_synthetic(root, 1, 0, view_size=32, code="after")
    assert data.stat().st_mtime_ns != stamp  # changed code: generated again
    assert json.loads((tmp_path / "src" / MARKER).read_text())["code"] == "after"


def test_generator_fingerprint_covers_the_generator_and_what_it_imports():
    closure = module_closure("refany3d.synthetic.build")
    assert {"refany3d.synthetic.objects", "refany3d.render.renderer", "refany3d.code_fingerprints"} <= set(
        closure
    )
    assert "refany3d.stages.keys" not in closure  # key changes alone do not regenerate rows
    assert generator_fingerprint() == module_fingerprint("refany3d.synthetic.build")
