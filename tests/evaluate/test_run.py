import json
from pathlib import Path

import pytest

from refany3d.config import EvaluateSettings, MetricsSettings
from refany3d.evaluate.run import (
    build_report,
    evaluate_sample,
    find_samples,
    metrics_table,
    read_sample,
    scorers,
    write_report,
)

from ._samples import write_samples


@pytest.fixture(scope="module")
def samples_dir(tmp_path_factory, asset, perfect):
    return write_samples(tmp_path_factory.mktemp("samples"), asset, perfect)


def test_find_samples_lists_sample_directories_or_fails_clearly(samples_dir, tmp_path):
    assert [p.name for p in find_samples(samples_dir)] == ["a-perfect", "b-wrong"]
    assert find_samples(samples_dir / "a-perfect") == [samples_dir / "a-perfect"]
    with pytest.raises(FileNotFoundError, match="no sample.json"):
        find_samples(tmp_path)


def test_evaluate_sample_reads_back_what_sample_saved(samples_dir):
    sample = read_sample(samples_dir / "a-perfect")
    out = evaluate_sample(sample, EvaluateSettings(), {})
    assert out["silhouette_iou"] > 0.9 and out["surface_distance"] < 5e-3 and out["texture_error"] < 0.1
    assert len(sample.views) == 2 and sample.prompt == "a toy robot"


def test_build_report_without_weights_skips_clip_and_dino_with_notes(samples_dir):
    settings = EvaluateSettings()
    models, notes = scorers(settings)
    assert models == {} and len(notes) == 2 and all("skipped" in n for n in notes)
    per = {p.name: evaluate_sample(read_sample(p), settings, models) for p in find_samples(samples_dir)}
    report = build_report(per, notes, settings)
    path = write_report(samples_dir, report)
    assert path == f"{samples_dir}/metrics.json"
    saved = json.loads(Path(path).read_text())
    assert set(saved["mean"]) == {"silhouette_iou", "surface_distance", "texture_error"}
    assert saved["samples"]["a-perfect"]["texture_error"] < saved["samples"]["b-wrong"]["texture_error"]
    assert saved["metrics"]["surface_distance"]["better"] == "lower"
    lines = metrics_table(saved)
    assert lines[0].split()[0] == "sample" and lines[-2].startswith("mean") and len(lines) == 5
    assert lines[-1].split()[:3] == ["mean", "covers", "2"]


def test_report_of_an_untextured_asset_is_json_with_a_null_and_a_note(samples_dir, tmp_path):
    import shutil

    import trimesh

    root = tmp_path / "samples"
    shutil.copytree(samples_dir, root, ignore=shutil.ignore_patterns("metrics.json"))
    shutil.copytree(root / "a-perfect", root / "c-untextured")
    grey = read_sample(root / "a-perfect").mesh
    plain = trimesh.Trimesh(grey.vertices, grey.faces, process=False)  # no texture, no colours
    (root / "c-untextured" / "asset.glb").write_bytes(plain.export(file_type="glb"))
    settings = EvaluateSettings()
    per = {p.name: evaluate_sample(read_sample(p), settings, {}) for p in find_samples(root)}
    text = Path(write_report(root, build_report(per, [], settings))).read_text()

    def no_nan(constant):
        raise AssertionError(f"{constant} in metrics.json")

    saved = json.loads(text, parse_constant=no_nan)
    assert saved["samples"]["c-untextured"]["texture_error"] is None
    assert saved["samples"]["c-untextured"]["surface_distance"] is not None
    assert [n for n in saved["notes"] if "texture_error" in n] == [
        "c-untextured: texture_error is null (the asset has no texture or vertex colours, or no pixel "
        "is foreground in both the point map and the RGB silhouette); its mean leaves it out"
    ]
    assert saved["count"] == {"silhouette_iou": 3, "surface_distance": 3, "texture_error": 2}
    cells = {s: saved["samples"][s]["texture_error"] for s in ("a-perfect", "b-wrong")}
    assert saved["mean"]["texture_error"] == pytest.approx(sum(cells.values()) / 2)
    table = metrics_table(saved)
    assert table[-1].split() == ["mean", "covers", "3", "of", "3", "3", "of", "3", "2", "of", "3"]
    assert table[3].split()[-1] == "-"  # c-untextured's texture_error


def test_scorers_with_local_weights_add_clip_and_dino_metrics(samples_dir, clip_dir, dino_dir):
    settings = EvaluateSettings(
        metrics=MetricsSettings(clip_weights=str(clip_dir), dino_weights=str(dino_dir))
    )
    models, notes = scorers(settings)
    assert set(models) == {"clip", "dino"} and notes == []
    out = evaluate_sample(read_sample(samples_dir / "a-perfect"), settings, models)
    assert {"clip_i_mean", "clip_i_max", "clip_t", "dino_mean", "dino_max"} <= set(out)
    assert -1.0 <= out["clip_i_mean"] <= out["clip_i_max"] <= 1.0 + 1e-6


def test_read_sample_takes_mesh_and_views_from_the_dataset(samples_dir, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from refany3d.evaluate.run import dataset_rows

    sample = tmp_path / "from-dataset"
    shutil.copytree(samples_dir / "a-perfect", sample)
    glb = (sample / "asset.glb").read_bytes()
    view = (sample / "views" / "rgb_00.png").read_bytes()
    (sample / "asset.glb").unlink()
    shutil.rmtree(sample / "views")
    meta = json.loads((sample / "sample.json").read_text())
    (sample / "sample.json").write_text(json.dumps({**meta, "sample_id": "s200k-000001-left"}))
    (tmp_path / "ds" / "data").mkdir(parents=True)
    rows = [{"sample_id": "s200k-000001-left", "mesh_glb": glb, "views_rgb": [{"bytes": view, "path": None}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ds" / "data" / "shard-0.parquet")

    dataset = dataset_rows(str(tmp_path / "ds"), {"s200k-000001-left"})
    got = read_sample(sample, dataset)
    assert len(got.views) == 1 and len(got.mesh.faces) == len(
        read_sample(samples_dir / "a-perfect").mesh.faces
    )
    with pytest.raises(FileNotFoundError, match="no asset.glb"):
        read_sample(sample)
