"""`refany3d evaluate --dataset s3://...`: meshes and views come from shards in a bucket (moto)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from refany3d.evaluate.run import dataset_rows
from refany3d.storage.fs import url_to_fs


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
