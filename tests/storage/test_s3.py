"""Object storage for real: s3fs against a moto S3 server over HTTP (`tests/s3server.py`)."""

from __future__ import annotations

import json

import fsspec
import pytest

from refany3d.storage.fs import s3_options, url_to_fs
from refany3d.storage.shards import list_tables, marker_complete, read_rows, write_marker, write_shard
from refany3d.storage.store import ArtifactStore, write_atomic
from refany3d.storage.versions import read_version, write_version

COLUMNS = ["sample_id", "source", "source_id", "side", "caption"]
ROW = {"source": "synthetic", "source_id": "r", "side": "left", "caption": "c"}


def test_s3_options_come_from_the_standard_aws_variables():
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "eu-west-3",
    }
    assert s3_options(env) == {
        "key": "k",
        "secret": "s",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-3"},
    }
    assert (
        s3_options({**env, "AWS_ENDPOINT_URL_S3": "http://s3"})["client_kwargs"]["endpoint_url"]
        == "http://s3"
    )
    assert s3_options({}) == {}  # botocore's own chain (profiles, instance roles) decides


def test_artifact_store_on_s3_puts_gets_and_lists(s3):
    store = ArtifactStore(s3.bucket() + "/build/artifacts")
    uri = store.put("mask/a.png", b"png")
    assert uri.startswith("s3://") and store.get(uri) == b"png" == store.get("mask/a.png")
    assert store.put_content("mask", b"png", ".png") == store.put_content("mask", b"png", ".png")
    assert list(store.list("mask")) == sorted(["mask/a.png", store.put_content("mask", b"png", ".png")[-33:]])


def _counted_s3() -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """A private s3fs (not fsspec's shared instance) and the S3 operations its client sends."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_options())
    fs.connect()
    sent: list[str] = []
    fs.s3.meta.events.register("before-call.s3", lambda model, **_: sent.append(model.name))
    return fs, sent


def test_write_atomic_on_s3_is_one_put_with_no_temporary_key(s3):
    """A temporary key renamed into place leaves no key behind either (the rename deletes it), but
    costs a copy and a delete, and a crash between them leaves both: only the requests tell."""
    fs, sent = _counted_s3()
    root = s3.bucket().removeprefix("s3://")
    write_atomic(fs, f"{root}/out/stats.json", b"{}")
    assert sent == ["PutObject"]
    assert fs.find(root) == [f"{root}/out/stats.json"] and fs.cat_file(f"{root}/out/stats.json") == b"{}"


def test_listings_see_what_another_process_wrote(s3):
    """s3fs caches listings; a shard another worker committed after this process listed must show."""
    out = s3.bucket() + "/build"
    first = write_shard(out, "k1", [{**ROW, "sample_id": "a"}], COLUMNS)
    assert [p.rsplit("/", 1)[-1] for p in list_tables(out)] == [first]
    other = fsspec.filesystem("s3", skip_instance_cache=True, **s3_options())  # another process's s3fs
    second = write_shard(out.replace("s3://", "memory://"), "k2", [{**ROW, "sample_id": "b"}], COLUMNS)
    other.pipe_file(f"{out.removeprefix('s3://')}/data/{second}", fsspec.filesystem("memory").cat_file(
        f"{out.removeprefix('s3://')}/data/{second}"))  # fmt: skip
    assert [p.rsplit("/", 1)[-1] for p in list_tables(out)] == sorted([first, second])
    write_marker(out, "k2", [second])
    other.rm(f"{out.removeprefix('s3://')}/data/{second}")
    assert not marker_complete(out, "k2")  # the marker lists a table that is gone: not done


def test_shards_markers_and_version_round_trip_on_s3(s3, tmp_path):
    out = s3.bucket() + "/build"
    names = [
        write_shard(u, "k", [{**ROW, "sample_id": i} for i in "xyz"], COLUMNS) for u in (out, str(tmp_path))
    ]
    assert names[0] == names[1]
    fs, root = url_to_fs(out)
    assert fs.cat_file(f"{root}/data/{names[0]}") == (tmp_path / "data" / names[0]).read_bytes()
    write_marker(out, "k", [names[0]])
    assert marker_complete(out, "k")
    version = write_version(out, list_tables(out))
    assert (
        read_version(out) == version
        and json.loads(fs.cat_file(f"{root}/version.json"))["shards"] == names[:1]
    )
    assert [r["sample_id"] for r in read_rows(list_tables(out))] == ["x", "y", "z"]


def test_a_bucket_that_does_not_exist_fails_in_one_line(s3):
    from refany3d.config import SettingsError
    from refany3d.preflight import check_writable

    with pytest.raises(SettingsError, match=r"^storage.out='s3://no-such-bucket-here/x': cannot write there"):
        check_writable("s3://no-such-bucket-here/x", "storage.out")
