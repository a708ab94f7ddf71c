"""Dataset versions: what one finished build holds, named by its content.

A finished build writes `OUT/version.json`: the content keys of its shards (a shard's file name is
the hash of the writing stage's content key and its sample ids, `shards.table_name`) and the
version id, a hash of those keys. Two builds that wrote the same shards are the same version,
wherever they were written; any changed shard is a new version. Scheduled retraining
(`flows/train.py`) trains once per version, the way TFX resolves a span.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

from refany3d.storage.fs import url_to_fs
from refany3d.storage.shards import DATA_DIR, list_tables
from refany3d.storage.store import join, write_atomic

VERSION_FILE = "version.json"


@dataclass(frozen=True)
class DatasetVersion:
    version: str  # "v-<16 hex>": hash of the sorted shard content keys
    root: str  # the build directory (any fsspec URL)
    shards: tuple[str, ...]  # shard file names under `root/data`, sorted

    def as_dict(self) -> dict:
        return {"version": self.version, "root": self.root, "shards": list(self.shards)}


def version_id(shards: Iterable[str]) -> str:
    """The version of a set of shard names (order and directory do not matter)."""
    names = sorted(posixpath.basename(s) for s in shards)
    return "v-" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def write_version(out: str, shards: Iterable[str]) -> DatasetVersion:
    """Write `OUT/version.json` for the finished build in `out` (call after its last shard)."""
    names = tuple(sorted(posixpath.basename(s) for s in shards))
    version = DatasetVersion(version_id(names), out, names)
    fs, root = url_to_fs(out)
    manifest = {"version": version.version, "shards": list(names)}
    write_atomic(fs, join(root, VERSION_FILE), json.dumps(manifest, indent=2).encode())
    return version


def read_version(url: str) -> DatasetVersion:
    """The version of the build in `url`: its `version.json`, or for a build written before
    versions existed, the one its shards make. FileNotFoundError when it has neither."""
    fs, root = url_to_fs(url)
    path = join(root, VERSION_FILE)
    if fs.exists(path):
        manifest = json.loads(fs.cat_file(path))
        return DatasetVersion(manifest["version"], url, tuple(manifest["shards"]))
    names = tuple(sorted(posixpath.basename(p) for p in list_tables(url, DATA_DIR)))
    if not names:
        raise FileNotFoundError(f"dataset: no {VERSION_FILE} and no shards under {url!r}")
    return DatasetVersion(version_id(names), url, names)
