import pytest
from fsspec.implementations.local import LocalFileSystem

from refany3d.storage.store import ArtifactStore, write_atomic


def test_put_get_roundtrip_local_and_memory(tmp_path):
    for root in (str(tmp_path / "store"), "memory://refany3d-test-store"):
        store = ArtifactStore(root)
        uri = store.put("a/b.bin", b"hello")
        assert store.get(uri) == b"hello" and store.get("a/b.bin") == b"hello"
        assert store.exists(uri) and list(store.list("a")) == ["a/b.bin"]


def test_put_content_is_content_addressed(tmp_path):
    store = ArtifactStore(str(tmp_path))
    a = store.put_content("mask", b"same", ".png")
    b = store.put_content("mask", b"same", ".png")
    c = store.put_content("mask", b"other", ".png")
    assert a == b != c and len(list(store.list("mask"))) == 2


class _CrashingFS(LocalFileSystem):
    """A real local filesystem whose writes die half-way, like a killed process."""

    def open(self, path, mode="rb", **kwargs):
        fh = super().open(path, mode, **kwargs)
        if "w" in mode:
            real_write = fh.write

            def write(data):
                real_write(data[: len(data) // 2])
                raise OSError("simulated crash mid-write")

            fh.write = write
        return fh


def test_write_atomic_crash_leaves_nothing_visible(tmp_path):
    fs = _CrashingFS()
    target = str(tmp_path / "data" / "shard.parquet")
    with pytest.raises(OSError, match="mid-write"):
        write_atomic(fs, target, b"x" * 1000)
    assert not (tmp_path / "data" / "shard.parquet").exists()
    assert list((tmp_path / "data").iterdir()) == []  # the temporary file is cleaned up too


def test_store_pickles_by_url(tmp_path):
    import pickle

    store = ArtifactStore(str(tmp_path))
    again = pickle.loads(pickle.dumps(store))
    assert again.root == store.root


def test_relative_root_gives_uris_that_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = ArtifactStore("out/artifacts")
    uri = store.put_content("image", b"png", ".png")
    assert uri.startswith(str(tmp_path)) and store.get(uri) == b"png"
    monkeypatch.chdir("/")
    assert ArtifactStore(str(tmp_path / "out/artifacts")).get(uri) == b"png"
