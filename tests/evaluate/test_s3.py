"""`refany3d evaluate --dataset s3://... --out s3://...`: meshes and views come from shards in a
bucket, metrics.json goes to one (moto)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from refany3d.cli import main
from refany3d.evaluate.run import dataset_rows, write_report
from refany3d.storage.fs import url_to_fs

from ._samples import write_samples


def test_dataset_rows_read_shards_from_s3(s3):
    rows = [
        {
            "sample_id": f"s-{i}",
            "mesh_glb": b"glTF" + bytes([i]),
            "views_rgb": [{"bytes": b"png", "path": None}],
        }
        for i in range(3)
    ]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    out = s3.bucket() + "/builds/eval"
    fs, root = url_to_fs(out)
    fs.pipe_file(f"{root}/data/shard-0.parquet", sink.getvalue().to_pybytes())
    got = dataset_rows(out, {"s-1", "s-2"})
    assert sorted(got) == ["s-1", "s-2"] and got["s-2"]["mesh_glb"] == b"glTF\x02"


def test_write_report_to_s3_puts_the_samples_then_metrics_json_last(s3, tmp_path):
    """Each file one PUT, no copy or delete, and the marker (metrics.json) after what it lists."""
    for name in ("s-1", "s-2"):
        (tmp_path / name / "views").mkdir(parents=True)
        (tmp_path / name / "image.png").write_bytes(b"png " + name.encode())
        (tmp_path / name / "views" / "rgb_00.png").write_bytes(b"view")
    out = s3.bucket() + "/evals/a"
    report = {"samples": {"s-1": {"silhouette_iou": None}, "s-2": {"silhouette_iou": 0.5}}}
    fs, root = url_to_fs(out)  # the instance write_report gets in this thread (fsspec caches one)
    sent: list[tuple[str, str]] = []

    def record(model, params, **_):
        sent.append((model.name, params.get("Key", "")))

    fs.s3.meta.events.register("before-parameter-build.s3", record)
    try:
        url = write_report(out, report, [tmp_path / "s-1", tmp_path / "s-2"])
    finally:
        fs.s3.meta.events.unregister("before-parameter-build.s3", record)
    keys = ["s-1/image.png", "s-1/views/rgb_00.png", "s-2/image.png", "s-2/views/rgb_00.png"]
    assert sent == [("PutObject", f"evals/a/{k}") for k in [*keys, "metrics.json"]]
    assert url == f"{out}/metrics.json" and json.loads(fs.cat_file(f"{root}/metrics.json")) == report
    assert fs.cat_file(f"{root}/s-2/image.png") == b"png s-2"


def test_evaluate_out_in_a_missing_bucket_exits_2_in_one_line(s3, tmp_path, asset, perfect, capsys):
    samples = write_samples(tmp_path / "samples", asset, perfect)
    code = main(["evaluate", "--samples", str(samples), "--out", "s3://no-such-bucket-here/e"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("refany3d evaluate: error: --out='s3://no-such-bucket-here/e': cannot write there")
    assert not (samples / "metrics.json").exists()
