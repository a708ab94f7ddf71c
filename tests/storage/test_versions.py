"""Dataset versions: named by the content keys of their shards, not by where they were written."""

from __future__ import annotations

import json

import pytest

from refany3d.storage.shards import write_shard
from refany3d.storage.versions import VERSION_FILE, read_version, version_id, write_version

COLUMNS = ["sample_id", "source", "source_id", "side", "caption"]


def _build(out, key: str, ids: list[str]) -> list[str]:
    row = {"source": "synthetic", "source_id": "r", "side": "left", "caption": "c"}
    return [write_shard(str(out), key, [{**row, "sample_id": i} for i in ids], COLUMNS)]


def test_write_version_names_the_shards_content_wherever_the_build_is(tmp_path):
    a = write_version(str(tmp_path / "a"), _build(tmp_path / "a", "k1", ["x", "y"]))
    b = write_version(str(tmp_path / "b"), _build(tmp_path / "b", "k1", ["y", "x"]))
    assert a.version == b.version and a.version.startswith("v-") and a.shards == b.shards
    manifest = json.loads((tmp_path / "a" / VERSION_FILE).read_text())
    assert manifest == {"version": a.version, "shards": list(a.shards)}
    assert read_version(str(tmp_path / "a")) == a
    changed = write_version(
        str(tmp_path / "c"), _build(tmp_path / "c", "k2", ["x", "y"])
    )  # other content key
    assert changed.version != a.version
    assert version_id(["d/s2", "s1"]) == version_id(["s1", "s2"])


def test_read_version_of_a_build_without_manifest_uses_its_shards(tmp_path):
    names = _build(tmp_path / "old", "k1", ["x"])
    assert read_version(str(tmp_path / "old")).version == version_id(names)
    with pytest.raises(FileNotFoundError, match="dataset"):
        read_version(str(tmp_path / "none"))
