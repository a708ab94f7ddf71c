"""`refany3d train --data s3://... --out s3://...` against a moto S3 server: the shards, the latent
cache, checkpoints, their manifests and the summary all live in the bucket, and a run resumes from
the checkpoints it left there."""

from __future__ import annotations

from refany3d.cli import main
from refany3d.storage.fs import url_to_fs
from refany3d.storage.versions import write_version
from tests.train.test_cli_train import TINY


def test_train_reads_shards_from_s3_and_checkpoints_and_resumes_there(dataset, s3, capsys):
    bucket = s3.bucket()
    fs, root = url_to_fs(bucket)
    for p in sorted((dataset / "data").glob("*.parquet")):
        fs.pipe_file(f"{root}/builds/ds/data/{p.name}", p.read_bytes())
    write_version(f"{bucket}/builds/ds", [p.name for p in (dataset / "data").glob("*.parquet")])
    args = ["train", "--data", f"{bucket}/builds/ds", "--out", f"{bucket}/runs/a", f"--set=data.cache={bucket}/cache",
            "--set=checkpoint.every=1", *TINY]  # fmt: skip
    assert main([*args, "--steps", "2"]) == 0, capsys.readouterr().err
    assert fs.exists(f"{root}/runs/a/checkpoints/step-00000002/adapters/domain_switcher.safetensors")
    assert fs.glob(f"{root}/cache/*/*.safetensors")  # the latent cache is in the bucket too
    capsys.readouterr()
    assert main([*args, "--steps", "3", "--resume"]) == 0
    assert "resumed from 2" in capsys.readouterr().out
    assert fs.exists(f"{root}/runs/a/checkpoints/step-00000003/manifest.json")
