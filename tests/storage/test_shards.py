import io
import json

import datasets
import pyarrow.parquet as pq
from PIL import Image

from refany3d.records import Rejection, image_cell
from refany3d.storage.card import write_card
from refany3d.storage.shards import (
    list_tables,
    marker_complete,
    prune_outputs,
    read_rows,
    write_marker,
    write_rejects,
    write_shard,
)

COLUMNS = ["sample_id", "source", "source_id", "image", "caption", "item", "category", "pose", "metrics"]


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _rows(ids):
    return [
        {
            "sample_id": i,
            "source": "subjects200k",
            "source_id": i[:-2],
            "image": image_cell(_png((10 * n, 0, 0))),
            "caption": f"caption {i}",
            "item": "mug",
            "category": "Kitchenware",
            "pose": [float(n)] * 16,
            "metrics": json.dumps({"iou": 0.9}),
        }
        for n, i in enumerate(ids)
    ]


def test_write_shard_twice_is_idempotent(tmp_path):
    out = str(tmp_path)
    a = write_shard(out, "key", _rows(["r1-l", "r1-r", "r2-l"]), COLUMNS)
    before = (tmp_path / "data" / a).read_bytes()
    b = write_shard(out, "key", list(reversed(_rows(["r1-l", "r1-r", "r2-l"]))), COLUMNS)
    assert a == b and list_tables(out) == [str(tmp_path / "data" / a)]
    assert (tmp_path / "data" / a).read_bytes() == before
    ids = [r["sample_id"] for r in read_rows(list_tables(out), ["sample_id"])]
    assert sorted(ids) == ["r1-l", "r1-r", "r2-l"]


def test_write_shard_name_depends_on_ids_and_key(tmp_path):
    a = write_shard(str(tmp_path), "key", _rows(["a-l"]), COLUMNS)
    b = write_shard(str(tmp_path), "key", _rows(["b-l"]), COLUMNS)
    c = write_shard(str(tmp_path), "other-key", _rows(["a-l"]), COLUMNS)
    assert len({a, b, c}) == 3 and len(list_tables(str(tmp_path))) == 3
    assert write_shard(str(tmp_path), "key", [], COLUMNS) is None


def test_list_tables_ignores_partial_temporary_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".tmp-123-shard-x.parquet").write_bytes(b"partial")
    assert list_tables(str(tmp_path)) == []


def test_shard_schema_is_versioned(tmp_path):
    name = write_shard(str(tmp_path), "key", _rows(["a-l"]), COLUMNS)
    meta = pq.read_schema(tmp_path / "data" / name).metadata
    assert json.loads(meta[b"refany3d"])["shard_schema_version"] == 2


def test_datasets_load_dataset_returns_pil_images(tmp_path):
    write_shard(str(tmp_path), "key", _rows(["a-l", "a-r"]), COLUMNS)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "data" / "*.parquet"), split="train")
    assert set(COLUMNS) <= set(ds.column_names)
    row = ds.sort("sample_id")[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (8, 8)
    assert row["pose"] == [0.0] * 16 and row["caption"] == "caption a-l"


def test_write_rejects_one_row_per_drop(tmp_path):
    drops = [
        Rejection("a-l", "a", "segment", "mask_too_large", 0.7),
        Rejection("b", "b", "split", "image_undecodable"),
    ]
    name = write_rejects(str(tmp_path), "key", drops)
    assert write_rejects(str(tmp_path), "key", drops) == name
    rows = pq.read_table(tmp_path / "rejects" / name).to_pylist()
    assert [(r["sample_id"], r["stage"], r["reason"], r["metric"]) for r in rows] == [
        ("a-l", "segment", "mask_too_large", 0.7),
        ("b", "split", "image_undecodable", None),
    ]


def test_write_card_header_is_datasets_config(tmp_path):
    import yaml

    stats = {"split": {"in": 4, "kept": 6, "dropped": 1, "dropped_image_undecodable": 1}}
    write_card(str(tmp_path), "demo", stats, {"until": "split"}, True, "split", ["data/shard-x.parquet"])
    text = (tmp_path / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["configs"][0]["data_files"][0]["path"] == "data/*.parquet"
    assert "ground-truth-backends" in header["tags"] and "Ground-truth backends" in text
    assert "| split | 4 | 6 | 1 | 0 | image_undecodable: 1 |" in text
    assert "transient drop" not in text
    assert json.loads((tmp_path / "stats.json").read_text())["uses_truth_backends"] is True


def test_write_card_counts_transient_drops_apart(tmp_path):
    stats = {"mesh": {"in": 4, "kept": 1, "dropped": 3, "transient": 2, "dropped_mesh_timeout": 2}}
    stats["mesh"]["dropped_mesh_not_manifold"] = 1
    write_card(str(tmp_path), "demo", stats, {"until": "mesh"}, True, "mesh", [])
    text = (tmp_path / "README.md").read_text()
    assert "| mesh | 4 | 1 | 3 | 2 | mesh_not_manifold: 1, mesh_timeout: 2 |" in text
    assert "**2 transient drop(s)**" in text


def test_marker_complete_only_while_every_listed_table_exists(tmp_path):
    out = str(tmp_path)
    assert not marker_complete(out, "k")
    name = write_shard(out, "k", _rows(["a-l"]), COLUMNS)
    write_marker(out, "k", [name])
    assert marker_complete(out, "k")
    (tmp_path / "data" / name).unlink()
    assert not marker_complete(out, "k")


def test_prune_outputs_removes_only_unlisted_tables_of_ours(tmp_path):
    out = str(tmp_path)
    keep = write_shard(out, "k", _rows(["a-l"]), COLUMNS)
    stale = write_shard(out, "old", _rows(["a-l"]), COLUMNS)
    (tmp_path / "data" / "users-own.parquet").write_bytes(b"not ours")
    write_marker(out, "k", [keep])
    write_marker(out, "old", [stale])
    removed = prune_outputs(out, {keep}, {"k.json"})
    assert [p.rsplit("/", 1)[1] for p in removed] == [stale]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted([keep, "users-own.parquet"])
    assert [p.name for p in (tmp_path / ".markers").iterdir()] == ["k.json"]
