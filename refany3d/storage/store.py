"""Artifact store over fsspec: local paths by default, any fsspec URL (s3://, gs://, memory://).

Writes are atomic: on a local disk bytes go to a temporary name beside the target and are renamed
into place; on an object store (s3://) one PUT of the whole object is atomic already (S3 has no
rename: a "rename" is a copy, and a crash between copy and delete leaves both). So a reader never
sees a partial file. Content-addressed puts name the object by its SHA-256, so the
same bytes written twice are one object.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec

from refany3d.storage.fs import atomic_rename, url_to_fs


def join(base: str, *parts: str) -> str:
    """Join URL/path parts with '/', keeping the protocol of `base`."""
    return posixpath.join(base.rstrip("/"), *parts) if base else posixpath.join(*parts)


class ArtifactStore:
    """Keyed bytes under one root URL.

    Keys are relative '/'-separated paths (`mask/ab12.png`); `uri(key)` is the full URL that a
    `Sample` carries, and `get` accepts either.
    """

    def __init__(self, root: str) -> None:
        root = root.rstrip("/") or "."
        # Local roots become absolute so the URIs samples carry resolve from any working directory.
        self.root = root if "://" in root else os.path.abspath(root)
        self.fs, self._root_path = url_to_fs(self.root)
        if atomic_rename(self.fs):  # an object store has no directories (and a build creates no buckets)
            self.fs.makedirs(self._root_path, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    def __reduce__(self):  # picklable across processes and Prefect results: rebuilt from the URL
        return (ArtifactStore, (self.root,))

    def uri(self, key: str) -> str:
        return join(self.root, key)

    def _path(self, key_or_uri: str) -> str:
        if "://" in key_or_uri or key_or_uri.startswith("/"):
            return url_to_fs(key_or_uri)[1]
        return join(self._root_path, key_or_uri)

    def put(self, key: str, data: bytes) -> str:
        """Write `data` at `key` atomically; returns its URI."""
        path = self._path(key)
        write_atomic(self.fs, path, data)
        return self.uri(key)

    def put_content(self, prefix: str, data: bytes, suffix: str) -> str:
        """Content-addressed put: `prefix/<sha256[:24]><suffix>`; skips the write if present."""
        key = f"{prefix}/{hashlib.sha256(data).hexdigest()[:24]}{suffix}"
        if not self.fs.exists(self._path(key)):
            self.put(key, data)
        return self.uri(key)

    def get(self, key_or_uri: str) -> bytes:
        return self.fs.cat_file(self._path(key_or_uri))

    def exists(self, key_or_uri: str) -> bool:
        return self.fs.exists(self._path(key_or_uri))

    def list(self, prefix: str, suffix: str = "") -> Iterator[str]:
        """Keys under `prefix` ending in `suffix`, sorted."""
        base = self._path(prefix)
        if not self.fs.exists(base):
            return iter(())
        found = sorted(p for p in self.fs.find(base) if p.endswith(suffix) and ".tmp-" not in p)
        root = self._root_path.rstrip("/") + "/"
        return iter(p[len(root) :] if p.startswith(root) else p for p in found)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write to a hidden temporary sibling, then rename; on an object store, one PUT of the whole
    object. Readers see all or nothing."""
    if not atomic_rename(fs):
        fs.pipe_file(path, data)
        return
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    try:
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def put_tree(directory: str | os.PathLike, url: str) -> list[str]:
    """Copy every file under the local `directory` to the same relative key under `url` (any
    fsspec URL), each with `write_atomic`; returns the keys, sorted. Nothing marks the copy as
    whole: the caller writes its marker after it."""
    fs, root = url_to_fs(url)
    base = Path(directory)
    keys = sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
    for key in keys:
        write_atomic(fs, join(root, key), (base / key).read_bytes())
    return keys
