"""`--out s3://...`: a build into a real S3 server (moto) writes the names and bytes of a build
into a local directory, and a rerun there is served from the cache kept beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from refany3d.config import BuildSettings, override
from refany3d.flows.build_dataset import build_dataset
from refany3d.storage.fs import url_to_fs
from refany3d.storage.versions import read_version
from tests.flows._runs import shard_bytes, task_runs

pytestmark = pytest.mark.usefixtures("prefect_harness")


def s3_shard_bytes(out: str) -> dict[str, bytes]:
    fs, root = url_to_fs(out)
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in sorted(fs.glob(f"{root}/data/*.parquet"))}


def test_build_into_s3_equals_a_local_build_and_reruns_from_its_cache(tmp_path, s3, s200k_source):
    def settings(out: str) -> BuildSettings:
        return override(
            BuildSettings(),
            **{
                "source.data_files": s200k_source,
                "storage.out": out,
                "until": "split",
                "runtime.batch_size": 3,
            },
        )

    local = tmp_path / "local"
    build_dataset(settings(str(local)))
    out = s3.bucket() + "/builds/nightly"
    first = build_dataset(settings(out))
    assert s3_shard_bytes(out) == shard_bytes(Path(local)) != {}
    assert read_version(out).version == read_version(str(local)).version == first["version"]
    fs, root = url_to_fs(out)
    assert {"README.md", "stats.json", "version.json", ".build-id"} <= {
        p.rsplit("/", 1)[-1] for p in fs.ls(root)
    }
    again = build_dataset(settings(out))
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        states = {t.state.name for t in task_runs(client, again["flow_run_id"], expect=1)}
    assert states == {"Cached"}  # the result store lives under the s3 output too
    assert s3_shard_bytes(out) == shard_bytes(Path(local))
